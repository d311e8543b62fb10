//! Forged Raft messages sent to a live cluster's peer port, as a robustness probe sent them
//! (issue 42): terms that overflow or jump absurdly, a leader that is no member, entries that
//! contradict the committed log. Each is refused; no member panics or changes its leader or
//! term, no acknowledged write is lost, and the members' key spaces stay identical.

mod common;

use std::time::Duration;

use common::Cluster;
use flotilla_proto::raft::PeerMessage;
use flotilla_proto::raft::raft_peer_client::RaftPeerClient;
use flotilla_store::codec;
use flotilla_store::node::StoreNode;
use flotilla_store::raft::network::WIRE_VERSION;
use flotilla_store::types::{Entry, EntryPayload, LogId, NodeId, TypeConfig};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Vote};
use tonic::transport::Channel;

async fn peer(addr: &str) -> RaftPeerClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RaftPeerClient::new(channel)
}

fn envelope<T: serde::Serialize>(cluster_id: u64, value: &T) -> PeerMessage {
    PeerMessage {
        cluster_id,
        payload: codec::encode(value).unwrap(),
        wire_version: WIRE_VERSION,
        ..Default::default()
    }
}

fn log_id(term: u64, leader: NodeId, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, leader), index)
}

fn blanks(term: u64, leader: NodeId, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indexes
        .map(|i| Entry {
            log_id: log_id(term, leader, i),
            payload: EntryPayload::Blank,
        })
        .collect()
}

fn append(
    term: u64,
    from: NodeId,
    prev: LogId,
    entries: Vec<Entry>,
) -> AppendEntriesRequest<TypeConfig> {
    let commit = entries.last().map_or(prev, |e| e.log_id);
    AppendEntriesRequest {
        vote: Vote::new_committed(term, from),
        prev_log_id: Some(prev),
        entries,
        leader_commit: Some(commit),
    }
}

/// The member's last log id (the cluster is quiet: every entry is of the leader's term).
fn last_log_id(node: &StoreNode, term: u64, leader: NodeId) -> LogId {
    log_id(term, leader, node.metrics().last_log_index.unwrap())
}

/// No member stopped; every member has `leader` as leader at `term`; the cluster takes a
/// write, every member applies it and their key spaces are equal; `acked/0..acked` are all
/// there on every member.
async fn assert_nothing_moved(c: &Cluster, leader: &StoreNode, term: u64, acked: usize) {
    for i in c.running() {
        let node = c.node(i);
        assert!(
            node.fatal_signal().borrow().is_none(),
            "{} stopped",
            node.name()
        );
        assert_eq!(
            (node.leader(), node.term()),
            (Some(leader.id()), term),
            "{}",
            node.name()
        );
    }
    common::put(leader, "after", "v").await;
    let rev = leader.kv().revision();
    common::eventually("every member applied the last write", || {
        c.running()
            .iter()
            .all(|i| c.node(*i).kv().revision() == rev)
    })
    .await;
    let hashes: Vec<u32> = c
        .running()
        .iter()
        .map(|i| c.node(*i).kv().hash(rev).unwrap().0)
        .collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    for i in c.running() {
        for k in 0..acked {
            assert_eq!(
                common::local_get(c.node(i), &format!("acked/{k}"))
                    .unwrap()
                    .as_deref(),
                Some("v")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_are_refused_and_change_nothing() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    for i in 0..20 {
        common::put(c.node(l), &format!("acked/{i}"), "v").await;
    }
    let leader = c.node(l).clone();
    let (leader_id, term, cluster) = (leader.id(), leader.term(), leader.cluster_id());
    common::eventually("every member applied every entry", || {
        let last = leader.metrics().last_log_index;
        c.running()
            .iter()
            .all(|i| c.node(*i).metrics().last_applied.map(|a| a.index) == last)
    })
    .await;
    let last = leader.metrics().last_log_index.unwrap();
    let stranger: NodeId = 0xdead_beef;
    let huge = 1_000_000_000_000;

    let mut refusals = 0;
    for i in c.running() {
        let node = c.node(i).clone();
        let mut p = peer(&c.slots[i].peer_addr).await;
        let tip = last_log_id(&node, term, leader_id);
        let below = log_id(term, leader_id, last - 5);
        let mut forged: Vec<(&str, PeerMessage, u32)> = vec![
            // The probe's first message: a term that overflows at the next election.
            (
                "term u64::MAX from the leader's id",
                envelope(cluster, &append(u64::MAX, leader_id, tip, vec![])),
                1,
            ),
            (
                "term u64::MAX from a stranger",
                envelope(cluster, &append(u64::MAX, stranger, tip, vec![])),
                1,
            ),
            // A heartbeat that would depose the leader.
            (
                "a heartbeat of term 10^12",
                envelope(cluster, &append(huge, leader_id, tip, vec![])),
                1,
            ),
            // The probe's second: prev below the commit index, blanks over committed entries.
            (
                "blanks over committed entries at a huge term",
                envelope(
                    cluster,
                    &append(
                        huge,
                        leader_id,
                        below,
                        blanks(huge, leader_id, last - 4..=last + 2),
                    ),
                ),
                1,
            ),
            (
                "blanks over committed entries at the next term",
                envelope(
                    cluster,
                    &append(
                        term + 1,
                        leader_id,
                        below,
                        blanks(term + 1, leader_id, last - 4..=last + 2),
                    ),
                ),
                1,
            ),
            (
                "a next-term leader that is no member",
                envelope(
                    cluster,
                    &append(
                        term + 1,
                        stranger,
                        tip,
                        blanks(term + 1, stranger, last + 1..=last + 3),
                    ),
                ),
                1,
            ),
            (
                "a vote for a stranger",
                envelope(
                    cluster,
                    &VoteRequest::new(
                        Vote::new(term + 1, stranger),
                        Some(log_id(term, leader_id, last + 1000)),
                    ),
                ),
                2,
            ),
            (
                "a vote at term u64::MAX",
                envelope(
                    cluster,
                    &VoteRequest::new(
                        Vote::new(u64::MAX, leader_id),
                        Some(log_id(term, leader_id, last + 1000)),
                    ),
                ),
                2,
            ),
            (
                "a snapshot from a stranger",
                envelope(
                    cluster,
                    &InstallSnapshotRequest::<TypeConfig> {
                        vote: Vote::new_committed(term + 1, stranger),
                        meta: flotilla_store::types::SnapshotMeta {
                            last_log_id: Some(log_id(term + 1, stranger, last + 10)),
                            last_membership: Default::default(),
                            snapshot_id: "forged".into(),
                        },
                        offset: 0,
                        data: vec![0; 16],
                        done: true,
                    },
                ),
                3,
            ),
        ];
        for (what, msg, method) in forged.drain(..) {
            let r = match method {
                1 => p.append_entries(msg).await,
                2 => p.vote(msg).await,
                _ => p.install_snapshot(msg).await,
            }
            .unwrap()
            .into_inner();
            assert!(
                r.error.starts_with("refused: "),
                "{what} sent to {}: {:?}",
                node.name(),
                r.error
            );
            assert!(r.payload.is_empty(), "{what}");
            refusals += 1;
        }
        // The same over the pipe, where a leader's AppendEntries travel.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = p
            .pipe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut msg = envelope(cluster, &append(u64::MAX, leader_id, tip, vec![]));
        (msg.call_id, msg.method) = (1, 1);
        tx.send(msg).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.error.starts_with("refused: "), "{:?}", r.error);
        refusals += 1;
    }
    let counted: u64 = c
        .running()
        .iter()
        .map(|i| c.node(*i).refused_peer_requests())
        .sum();
    assert_eq!(counted, refusals);

    // Nothing moved: the same leader at the same term everywhere, every write still there and
    // the key spaces equal; the cluster takes writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_nothing_moved(&c, &leader, term, 20).await;
    c.shutdown().await;
}

/// A caller that does not know the cluster id learns it only as a member added and not yet
/// started; a caller of another cluster is not told this one's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_id_is_not_handed_out_to_strangers() {
    use flotilla_store::raft::peer::Hello;
    let c = Cluster::start(1, |_| {}).await;
    let node = c.node(0).clone();
    let mut p = peer(&c.slots[0].peer_addr).await;
    let hello = Hello {
        peer_addr: "127.0.0.1:1".into(),
    };
    let r = p.hello(envelope(0, &hello)).await.unwrap().into_inner();
    assert!(r.payload.is_empty() && r.cluster_id == 0, "{r:?}");
    assert!(r.error.contains("cluster add"), "{}", r.error);
    let r = p.hello(envelope(42, &hello)).await.unwrap().into_inner();
    assert!(r.error.contains("cluster id mismatch"), "{}", r.error);
    let ours = format!("{:x}", node.cluster_id());
    assert!(!r.error.contains(&ours), "{}", r.error);
    // Once added, the new member's address is answered.
    node.add_member("127.0.0.1:1".into(), true).await.unwrap();
    let r = p.hello(envelope(0, &hello)).await.unwrap().into_inner();
    assert!(r.error.is_empty(), "{}", r.error);
    let reply: flotilla_store::raft::peer::HelloReply = codec::decode(&r.payload).unwrap();
    assert_eq!(reply.cluster_id, node.cluster_id());
    c.shutdown().await;
}

/// A member that was down while another was added still takes requests from that other (the
/// voters it knows vouch for it), and never from a sender no voter lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_while_another_was_down_is_vouched_for() {
    let mut c = Cluster::start(3, |_| {}).await;
    c.leader().await;
    let lagging = 2;
    let lagging_id = c.node(lagging).id();
    c.stop(lagging).await;
    let (n4, listener) = c.add_slot("n4").await;
    let added = c
        .node(0)
        .add_member(c.slots[n4].peer_addr.clone(), true)
        .await
        .expect("learner added");
    c.join(n4, listener).await;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while let Err(e) = c.node(0).promote_member(added).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never promoted: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The lagging member comes back cut off from the others' Raft traffic, so its log (and
    // membership) stays as it was.
    c.partition.isolate(lagging_id, &c.ids());
    c.restart(lagging).await;
    let node = c.node(lagging).clone();
    assert!(!node.members().iter().any(|m| m.id == added));
    let cluster = node.cluster_id();
    let mut p = peer(&c.slots[lagging].peer_addr).await;
    let heartbeat = |from: NodeId| {
        let term = node.term() + 1;
        envelope(
            cluster,
            &AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new_committed(term, from),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            },
        )
    };
    let first = p
        .append_entries(heartbeat(added))
        .await
        .unwrap()
        .into_inner();
    assert!(first.error.contains("not a voter"), "{:?}", first.error);
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let r = p
            .append_entries(heartbeat(added))
            .await
            .unwrap()
            .into_inner();
        if r.error.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never vouched for: {:?}",
            r.error
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A stranger stays one, however long it tries.
    for _ in 0..3 {
        let r = p
            .append_entries(heartbeat(0xdead_beef))
            .await
            .unwrap()
            .into_inner();
        assert!(r.error.contains("not a voter"), "{:?}", r.error);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    c.shutdown().await;
}

/// Opens a stopped member's log database, once the previous handle has let go of it.
async fn open_log(dir: &std::path::Path) -> sled::Db {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        match sled::open(dir.join("log")) {
            Ok(db) => return db,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Starts member `i` of `c` from its data dir, retrying while the last handle on its files
/// is being released; the error, if it is refused.
async fn start_again(c: &Cluster, i: usize) -> Result<StoreNode, String> {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let config = c.config(i, Vec::new(), flotilla_store::node::ClusterState::New);
        let l = common::rebind(&c.slots[i].peer_addr).await;
        match StoreNode::start(config, l).await {
            Ok(n) => return Ok(n),
            Err(e) if e.to_string().contains("WouldBlock") || e.to_string().contains("lock") => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A data dir whose log and key space contradict each other (here: the log rewritten under
/// the applied entry, or a vote for a term no cluster reaches) is refused at start, with the
/// way out; the member starts again once the damage is undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_dir_is_refused_at_start() {
    let mut c = Cluster::start(1, |_| {}).await;
    for i in 0..10 {
        common::put(c.node(0), &format!("k{i}"), "v").await;
    }
    let dir = c.node(0).config().data_dir.clone();
    // A put is answered once applied; the metrics report the entry a moment later (Raft
    // runs on threads of its own).
    {
        let node = c.node(0).clone();
        common::eventually("every entry applied", || {
            let m = node.metrics();
            m.last_applied.map(|l| l.index) == m.last_log_index
        })
        .await;
    }
    let last = c.node(0).metrics().last_applied.unwrap();
    c.stop(0).await;

    let key = last.index.to_be_bytes();
    let (original, vote) = {
        let db = open_log(&dir).await;
        let logs = db.open_tree("raft/log").unwrap();
        let meta = db.open_tree("raft/meta").unwrap();
        let original = logs.get(key).unwrap().expect("the applied entry");
        let forged = Entry {
            log_id: log_id(last.leader_id.term - 1, last.leader_id.node_id, last.index),
            payload: EntryPayload::Blank,
        };
        logs.insert(key, codec::encode(&forged).unwrap()).unwrap();
        db.flush().unwrap();
        (original, meta.get("vote").unwrap().unwrap())
    };
    let err = start_again(&c, 0).await.err().expect("refused");
    assert!(
        err.contains("the key space applied entry") && err.contains("wipe its data dir"),
        "{err}"
    );
    {
        let db = open_log(&dir).await;
        db.open_tree("raft/log")
            .unwrap()
            .insert(key, original)
            .unwrap();
        let huge = Vote::new_committed(u64::MAX, last.leader_id.node_id);
        db.open_tree("raft/meta")
            .unwrap()
            .insert("vote", codec::encode(&huge).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let err = start_again(&c, 0).await.err().expect("refused");
    assert!(err.contains("no cluster reaches"), "{err}");
    {
        let db = open_log(&dir).await;
        db.open_tree("raft/meta")
            .unwrap()
            .insert("vote", vote)
            .unwrap();
        db.flush().unwrap();
    }
    let node = start_again(&c, 0).await.expect("starts once repaired");
    c.slots[0].node = Some(node);
    assert_eq!(
        common::get(c.node(0), "k9").await.unwrap().as_deref(),
        Some("v")
    );
    c.shutdown().await;
}

/// A fuzz of the peer port of a live cluster: 600 messages with the cluster's id and wire
/// version, to every method, whose payloads are random bytes, or valid messages with bytes
/// overwritten, claiming to come from a node that is no member. Whatever each is answered,
/// no member stops, the leader and term stay, writes acknowledged before are all there,
/// and the key spaces stay identical. (Seeded: the same messages every run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_peer_messages_change_nothing() {
    use rand::{Rng, SeedableRng};
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    for i in 0..10 {
        common::put(c.node(l), &format!("acked/{i}"), "v").await;
    }
    let leader = c.node(l).clone();
    let (leader_id, term, cluster) = (leader.id(), leader.term(), leader.cluster_id());
    let stranger: NodeId = 0x5eed;
    let last = last_log_id(&leader, term, leader_id);
    let templates: Vec<Vec<u8>> = vec![
        codec::encode(&append(
            term,
            stranger,
            last,
            blanks(term, stranger, last.index + 1..=last.index + 3),
        ))
        .unwrap(),
        codec::encode(&append(term + 1, stranger, last, Vec::new())).unwrap(),
        codec::encode(&VoteRequest::<NodeId>::new(
            Vote::new(term + 1, stranger),
            Some(last),
        ))
        .unwrap(),
        codec::encode(&flotilla_store::raft::peer::Hello {
            peer_addr: "127.0.0.1:1".into(),
        })
        .unwrap(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut clients = Vec::new();
    for i in c.running() {
        clients.push(peer(&c.slots[i].peer_addr).await);
    }
    for n in 0..600 {
        let payload = if n % 2 == 0 {
            let len = rng.random_range(0..300);
            (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
        } else {
            let mut p = templates[rng.random_range(0..templates.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
            p
        };
        let msg = PeerMessage {
            cluster_id: cluster,
            payload,
            wire_version: WIRE_VERSION,
            ..Default::default()
        };
        let to = &mut clients[n % 3];
        // Answers (mostly refusals) do not matter here; what follows does.
        let _ = match n % 5 {
            0 => to.append_entries(msg).await,
            1 => to.vote(msg).await,
            2 => to.install_snapshot(msg).await,
            3 => to.leader(msg).await,
            _ => to.hello(msg).await,
        };
    }
    assert_nothing_moved(&c, &leader, term, 10).await;
    c.shutdown().await;
}
