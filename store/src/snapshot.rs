//! Snapshot files: the whole key space at one log position, checksummed.
//!
//! The same format serves Raft (a lagging member is caught up by streaming this file to it in
//! chunks) and backups. Layout: the magic bytes and a format version, then length-prefixed
//! bincode frames — one header (the Raft position, the revision and compact revision, the
//! cluster id), every record, every metadata entry — and an end frame with the number of frames
//! and a CRC-32 of every byte before it. A truncated or altered file fails the check.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::mvcc::Revision;
use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"FLOTSNAP";
const FORMAT_VERSION: u32 = 1;
/// No frame is larger than a record plus its framing; this bounds what a corrupt length
/// prefix can make the reader allocate.
const MAX_FRAME: u32 = 64 * 1024 * 1024;

/// What a snapshot is of.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub meta: SnapshotMeta,
    pub cluster_id: u64,
    pub revision: i64,
    pub compact_revision: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Header(SnapshotHeader),
    Record {
        main: i64,
        sub: i64,
        #[serde(with = "codec::bytes")]
        value: Vec<u8>,
    },
    Meta {
        #[serde(with = "codec::bytes")]
        key: Vec<u8>,
        #[serde(with = "codec::bytes")]
        value: Vec<u8>,
    },
    End {
        frames: u64,
        checksum: u32,
    },
}

/// One item of a snapshot's body.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotItem {
    /// An encoded [`crate::mvcc::Record`] at a revision.
    Record(Revision, Vec<u8>),
    /// A backend metadata entry (leases, revision counters).
    Meta(Vec<u8>, Vec<u8>),
}

/// Writes a snapshot file; [`SnapshotWriter::finish`] makes it durable.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    frames: u64,
}

impl SnapshotWriter {
    pub fn create(path: &Path, header: SnapshotHeader) -> io::Result<Self> {
        Self::new(File::create(path)?, header)
    }

    /// Writes a snapshot into `file` (empty, opened for writing).
    pub fn new(file: File, header: SnapshotHeader) -> io::Result<Self> {
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            frames: 0,
        };
        w.raw(MAGIC)?;
        w.raw(&FORMAT_VERSION.to_le_bytes())?;
        w.frame(&Frame::Header(header))?;
        Ok(w)
    }

    pub fn record(&mut self, rev: Revision, value: Vec<u8>) -> io::Result<()> {
        self.frame(&Frame::Record {
            main: rev.main,
            sub: rev.sub,
            value,
        })
    }

    pub fn meta(&mut self, key: Vec<u8>, value: Vec<u8>) -> io::Result<()> {
        self.frame(&Frame::Meta { key, value })
    }

    /// Writes the end frame and fsyncs; returns the file's size.
    pub fn finish(mut self) -> io::Result<u64> {
        let end = Frame::End {
            frames: self.frames,
            checksum: self.crc.clone().finalize(),
        };
        self.frame(&end)?;
        self.out.flush()?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    fn frame(&mut self, frame: &Frame) -> io::Result<()> {
        let body = codec::encode(frame).map_err(io::Error::other)?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io::Error::other(format!("snapshot frame of {} bytes", body.len())))?;
        self.raw(&len.to_le_bytes())?;
        self.raw(&body)?;
        self.frames += 1;
        Ok(())
    }
}

/// Reads a snapshot file, checking its checksum at the end.
pub struct SnapshotReader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    frames: u64,
    header: SnapshotHeader,
    done: bool,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl SnapshotReader<BufReader<File>> {
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::new(BufReader::with_capacity(1 << 20, File::open(path)?))
    }
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(input: R) -> io::Result<Self> {
        let mut crc = crc32fast::Hasher::new();
        let mut input = input;
        let mut magic = [0u8; 12];
        input
            .read_exact(&mut magic)
            .map_err(|_| invalid("not a Flotilla snapshot: too short"))?;
        if &magic[..8] != MAGIC {
            return Err(invalid("not a Flotilla snapshot: wrong magic bytes"));
        }
        let version = u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]);
        if version != FORMAT_VERSION {
            return Err(invalid(format!(
                "snapshot format {version} is not supported (expected {FORMAT_VERSION})"
            )));
        }
        crc.update(&magic);
        let mut reader = Self {
            input,
            crc,
            frames: 0,
            header: dummy_header(),
            done: false,
        };
        match reader.frame()? {
            Frame::Header(h) => reader.header = h,
            _ => return Err(invalid("snapshot does not start with a header")),
        }
        Ok(reader)
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The next item, or `None` at a verified end.
    pub fn next_item(&mut self) -> io::Result<Option<SnapshotItem>> {
        if self.done {
            return Ok(None);
        }
        let expected = self.crc.clone().finalize();
        let frames = self.frames;
        match self.frame()? {
            Frame::Record { main, sub, value } => {
                Ok(Some(SnapshotItem::Record(Revision::new(main, sub), value)))
            }
            Frame::Meta { key, value } => Ok(Some(SnapshotItem::Meta(key, value))),
            Frame::End {
                frames: count,
                checksum,
            } => {
                if checksum != expected || count != frames {
                    return Err(invalid("snapshot checksum mismatch: the file is corrupt"));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(invalid("snapshot has bytes after its end frame"));
                }
                self.done = true;
                Ok(None)
            }
            Frame::Header(_) => Err(invalid("snapshot has a second header")),
        }
    }

    /// Reads to the end, checking the checksum; returns the header.
    pub fn verify(mut self) -> io::Result<SnapshotHeader> {
        while self.next_item()?.is_some() {}
        Ok(self.header)
    }

    fn frame(&mut self) -> io::Result<Frame> {
        let mut len = [0u8; 4];
        self.input
            .read_exact(&mut len)
            .map_err(|_| invalid("snapshot is truncated"))?;
        let n = u32::from_le_bytes(len);
        if n > MAX_FRAME {
            return Err(invalid(format!(
                "snapshot frame claims {n} bytes: the file is corrupt"
            )));
        }
        let mut body = vec![0u8; n as usize];
        self.input
            .read_exact(&mut body)
            .map_err(|_| invalid("snapshot is truncated"))?;
        self.crc.update(&len);
        self.crc.update(&body);
        self.frames += 1;
        codec::decode(&body).map_err(|e| invalid(format!("snapshot frame is corrupt: {e}")))
    }
}

fn dummy_header() -> SnapshotHeader {
    SnapshotHeader {
        meta: SnapshotMeta::default(),
        cluster_id: 0,
        revision: 0,
        compact_revision: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(path: &Path) -> u64 {
        let header = SnapshotHeader {
            cluster_id: 7,
            revision: 3,
            compact_revision: 1,
            meta: SnapshotMeta::default(),
        };
        let mut w = SnapshotWriter::create(path, header).unwrap();
        w.record(Revision::new(1, 0), b"one".to_vec()).unwrap();
        w.record(Revision::new(3, 1), b"three".to_vec()).unwrap();
        w.meta(b"k".to_vec(), b"v".to_vec()).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        write_sample(&path);
        let mut r = SnapshotReader::open(&path).unwrap();
        assert_eq!(r.header().cluster_id, 7);
        let mut items = Vec::new();
        while let Some(item) = r.next_item().unwrap() {
            items.push(item);
        }
        assert_eq!(
            items,
            vec![
                SnapshotItem::Record(Revision::new(1, 0), b"one".to_vec()),
                SnapshotItem::Record(Revision::new(3, 1), b"three".to_vec()),
                SnapshotItem::Meta(b"k".to_vec(), b"v".to_vec()),
            ]
        );
    }

    #[test]
    fn truncated_or_altered_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let size = write_sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 5, 20, size as usize - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                SnapshotReader::open(&path)
                    .and_then(|r| r.verify())
                    .is_err(),
                "cut at {cut}"
            );
        }
        for flip in [30, 45, size as usize - 3] {
            let mut altered = bytes.clone();
            altered[flip] ^= 0x40;
            std::fs::write(&path, &altered).unwrap();
            assert!(
                SnapshotReader::open(&path)
                    .and_then(|r| r.verify())
                    .is_err(),
                "flip at {flip}"
            );
        }
        std::fs::write(&path, b"not a snapshot at all").unwrap();
        let err = SnapshotReader::open(&path).err().unwrap();
        assert!(err.to_string().contains("not a Flotilla snapshot"), "{err}");
    }
}
