//! The fault-injecting proxy in front of every member's peer port.
//!
//! Members advertise the proxy's address as their peer address and listen elsewhere, so all
//! Raft and leader traffic to a member passes through its proxy. Each member connects to its
//! peers from its own loopback address (`--peer-source-ip 127.0.0.(10+i)`), which tells the
//! proxy who is talking. A connection's bytes then flow through two pumps, one per direction,
//! each of which consults the current [`NetState`]:
//!
//! - a cut link stalls the bytes flowing that way until it heals (as a real partition does to
//!   TCP: the peer's keep-alive or request deadline notices), and a connection opened across a
//!   cut link is closed at once, as a connect across a partition fails;
//! - latency delays each chunk, in order;
//! - loss cannot drop bytes from a TCP stream without breaking it, so a "lost" chunk is
//!   delayed by a retransmission timeout instead, which is what TCP makes of packet loss.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the retransmission of a lost chunk costs.
const RETRANSMIT_DELAY: Duration = Duration::from_millis(200);

/// The loopback address member `i` sends its peer traffic from.
pub fn source_ip(member: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + member as u8))
}

/// Which member a peer connection comes from, by its source address.
fn member_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 127 && o[1] == 0 && o[2] == 0 && o[3] >= 10).then(|| usize::from(o[3] - 10))
        }
        IpAddr::V6(_) => None,
    }
}

/// The state of the network between members.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetState {
    /// Links cut, as (from, to): bytes from `from` to `to` do not flow.
    pub cut: BTreeSet<(usize, usize)>,
    /// Added one-way latency on every link.
    pub latency: Duration,
    /// Up to this much more, uniformly.
    pub jitter: Duration,
    /// Share of chunks "lost" (delayed by a retransmission), 0 to 1.
    pub loss: f64,
}

impl NetState {
    pub fn allows(&self, from: usize, to: usize) -> bool {
        !self.cut.contains(&(from, to))
    }

    /// Cuts both directions between every member of `a` and every member of `b`.
    pub fn cut_between(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }
}

/// Runs the proxy for member `to`: accepts on `listener`, forwards to `target`.
pub fn spawn(
    to: usize,
    listener: TcpListener,
    target: SocketAddr,
    net: watch::Receiver<NetState>,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn = 0u64;
        loop {
            let Ok((inbound, addr)) = listener.accept().await else {
                continue;
            };
            conn += 1;
            let from = member_of(addr.ip());
            if let Some(f) = from
                && !net.borrow().allows(f, to)
            {
                // The connect would not have got through.
                drop(inbound);
                continue;
            }
            let net = net.clone();
            let seed = seed ^ conn.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                let up = pump(ir, ow, from.map(|f| (f, to)), net.clone(), seed);
                let down = pump(or, iw, from.map(|f| (to, f)), net, seed.rotate_left(17));
                tokio::join!(up, down);
            });
        }
    })
}

/// Copies one direction of a connection, applying the link `link`'s faults (none when the
/// connection does not come from a member).
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    link: Option<(usize, usize)>,
    mut net: watch::Receiver<NetState>,
    seed: u64,
) where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    };
    let read = async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Hold the bytes while the link is cut.
            let state = loop {
                let state = net.borrow_and_update().clone();
                if link.is_none_or(|(f, t)| state.allows(f, t)) {
                    break state;
                }
                if net.changed().await.is_err() {
                    return;
                }
            };
            let mut delay = Duration::ZERO;
            if link.is_some() {
                delay = state.latency;
                if !state.jitter.is_zero() {
                    delay += state.jitter.mul_f64(rng.random::<f64>());
                }
                if state.loss > 0.0 && rng.random_bool(state.loss.clamp(0.0, 1.0)) {
                    delay += RETRANSMIT_DELAY;
                }
            }
            // Chunks leave in the order they came.
            let at = (Instant::now() + delay).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn connect_from(member: usize, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source_ip(member), 0))?;
        socket.connect(to).await
    }

    async fn roundtrip(s: &mut TcpStream, within: Duration) -> bool {
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(within, s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        )
    }

    #[tokio::test]
    async fn cut_links_stall_and_heal_and_identify_the_sender() {
        let target = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (net, rx) = watch::channel(NetState::default());
        spawn(1, listener, target, rx, 7);

        let mut from0 = connect_from(0, proxy).await.unwrap();
        let mut from2 = connect_from(2, proxy).await.unwrap();
        assert!(roundtrip(&mut from0, Duration::from_secs(5)).await);

        // Cutting 0 -> 1 stalls member 0's bytes but not member 2's.
        net.send_modify(|s| {
            s.cut.insert((0, 1));
        });
        assert!(!roundtrip(&mut from0, Duration::from_millis(300)).await);
        assert!(roundtrip(&mut from2, Duration::from_secs(5)).await);

        // Healing delivers what was held.
        net.send_modify(|s| s.cut.clear());
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), from0.read_exact(&mut buf))
            .await
            .expect("held bytes are delivered after healing")
            .unwrap();
        assert_eq!(&buf, b"ping");

        // The reply direction alone (1 -> 0) stalls the answer.
        net.send_modify(|s| {
            s.cut.insert((1, 0));
        });
        assert!(!roundtrip(&mut from0, Duration::from_millis(300)).await);
        net.send_modify(|s| s.cut.clear());
    }

    #[tokio::test]
    async fn latency_delays_in_order() {
        let target = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (net, rx) = watch::channel(NetState::default());
        spawn(1, listener, target, rx, 7);
        net.send_modify(|s| s.latency = Duration::from_millis(100));
        let mut s = connect_from(0, proxy).await.unwrap();
        let started = std::time::Instant::now();
        for i in 0..5u8 {
            s.write_all(&[i]).await.unwrap();
        }
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 4]);
        // There and back: at least twice the one-way latency.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
