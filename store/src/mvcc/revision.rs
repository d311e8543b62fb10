//! Revisions: the one currency between the key space, the watch hub and Raft.

/// A point in the store's history.
///
/// `main` is the cluster revision: +1 for each committed write transaction. `sub` orders the
/// writes inside one transaction (a Txn that puts three keys writes `(r,0)`, `(r,1)`, `(r,2)`).
/// Ordering is lexicographic, which is the order events are delivered to watchers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    /// The encoded length of a revision key.
    pub const LEN: usize = 16;

    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// Big-endian encoding, so that byte order equals revision order in a sorted tree.
    ///
    /// Revisions are never negative; the sign bit is cleared to keep the order total anyway.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&(self.main.max(0) as u64).to_be_bytes());
        out[8..].copy_from_slice(&(self.sub.max(0) as u64).to_be_bytes());
        out
    }

    /// Decodes [`Revision::to_bytes`]; `None` for anything that is not exactly 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let main = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let sub = u64::from_be_bytes(bytes[8..].try_into().ok()?);
        Some(Self::new(main as i64, sub as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_is_revision_order() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 0),
            Revision::new(256, 300),
            Revision::new(i64::MAX, 0),
        ];
        for pair in revs.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_bytes() < pair[1].to_bytes());
        }
        for r in revs {
            assert_eq!(Revision::from_bytes(&r.to_bytes()), Some(r));
        }
        assert_eq!(Revision::from_bytes(b"short"), None);
    }
}
