//! Linearizability checker for a key-value register with compare-and-set.
//!
//! This is the Wing & Gong search with Lowe's memoisation ("WGL"), in the
//! style of [Porcupine](https://github.com/anishathalye/porcupine):
//!
//! * The history is partitioned by key. Each key is an independent register and
//!   linearizability is compositional (P-compositionality), so each key is
//!   checked on its own.
//! * A key's operations become time-ordered, doubly linked lists of call and
//!   return events (calls before returns at equal times, i.e. touching
//!   operations are concurrent). A depth-first search repeatedly takes an
//!   operation whose call comes before the first pending return, applies it
//!   to the register model, *lifts* it (its call and return) out of the lists
//!   and starts again from the head. If the scan reaches a return event, that
//!   operation cannot be linearized any more on this path, so the search
//!   backtracks (pops the last choice, *unlifts* it and tries the next
//!   candidate).
//! * Configurations (set of linearized operations, register value) already
//!   explored are memoised so that no configuration is explored twice.
//!
//! Operations with an unknown outcome (`Outcome::Indeterminate`: timeouts,
//! lost connections) have no return event: they may be linearized at any
//! point after their invocation, or never, and the search succeeds as soon as
//! every *completed* operation is linearized. Naively, every pending
//! indeterminate operation is a candidate at every dead end for the rest of
//! the history, which blows the search up. So (details at `search`):
//!
//! * a configuration is pruned if an explored one has the same completed
//!   operations and value and a *subset* of its indeterminate operations;
//! * indeterminate operations are only linearized in a normal form (right
//!   before a completed operation that needs them, never overwritten or
//!   without effect), and interchangeable ones only in time order;
//! * values that no operation observes (no read returns them, no CAS expects
//!   them) are indistinguishable, so they share a single model state.
//!
//! The set of linearized completed operations is memoised as a 128-bit
//! fingerprint (exact up to 128 operations, a Zobrist hash beyond: see
//! `DoneSet`).
//!
//! When a key is not linearizable, the failing sub-history is shrunk (see
//! `shrink`): cut after the operation the search got stuck on (Porcupine's
//! longest-prefix idea), cut before it as far as the failure persists, then
//! remove operations greedily (delta-debugging style) while the remainder is
//! still not linearizable, never removing the only writer of a value that a
//! remaining operation observed. The explanation names the operation that
//! could not be linearized and the values the register could hold instead.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

/// Value of a register: None = key absent.
pub type Value = Option<String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write(String),
    /// Compare-and-set: if current == expect then set to `new`.
    Cas {
        expect: Value,
        new: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Read returned this value.
    ReadOk(Value),
    /// Write acknowledged.
    WriteOk,
    /// CAS completed: true = it swapped, false = compare failed (no effect).
    CasOk(bool),
    /// Unknown whether it took effect (timeout, connection lost): the op may have
    /// taken effect at any time after invocation, or never.
    Indeterminate,
    /// Definitely failed with no effect (e.g. rejected before being proposed).
    Failed,
}

#[derive(Clone, Debug)]
pub struct Operation {
    /// Unique in the history, used in reports.
    pub id: usize,
    pub client: usize,
    pub key: String,
    pub op: Op,
    /// Monotonic timestamp (e.g. nanos since start).
    pub invoke: u64,
    /// Completion timestamp; ignored for `Indeterminate`.
    pub complete: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub struct Anomaly {
    pub key: String,
    /// The operations of the smallest sub-history found that cannot be
    /// linearized, ordered by invoke time.
    pub ops: Vec<Operation>,
    /// Human-readable explanation: which operation could not be linearized
    /// and which values the register could have held at that point.
    pub explanation: String,
}

#[derive(Clone, Debug)]
pub enum Verdict {
    Linearizable,
    NotLinearizable(Anomaly),
    /// Search budget exhausted (or the history was malformed for that key).
    Unknown {
        key: String,
        reason: String,
    },
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

/// Time spent shrinking a non-linearizable key to a small anomaly. When it
/// runs out, the smallest failing sub-history found so far is reported.
pub const SHRINK_BUDGET: Duration = Duration::from_secs(2);

/// Checks the whole history; the initial value of every key is None (absent).
///
/// There is no time limit: pathological histories (e.g. very many concurrent
/// indeterminate operations on one key) can take exponential time. Use
/// [`check_with_budget`] to bound it.
///
/// Keys are checked in lexicographic order. The first non-linearizable key is
/// reported; otherwise the first key whose check was inconclusive (budget or
/// malformed input) yields `Verdict::Unknown`.
pub fn check(history: &[Operation]) -> Verdict {
    check_history(history, None)
}

/// Same as [`check`] with a time budget per key; exceeding it yields
/// `Verdict::Unknown`. Shrinking a failing key takes up to an extra
/// [`SHRINK_BUDGET`].
pub fn check_with_budget(history: &[Operation], per_key: Duration) -> Verdict {
    check_history(history, Some(per_key))
}

// ---------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------

fn show_value(v: &Value) -> String {
    match v {
        None => "absent".to_string(),
        Some(s) => format!("{s:?}"),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Read => write!(f, "read"),
            Op::Write(v) => write!(f, "write({v:?})"),
            Op::Cas { expect, new } => write!(f, "cas({} -> {new:?})", show_value(expect)),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::ReadOk(v) => write!(f, "{}", show_value(v)),
            Outcome::WriteOk => write!(f, "ok"),
            Outcome::CasOk(true) => write!(f, "swapped"),
            Outcome::CasOk(false) => write!(f, "not swapped"),
            Outcome::Indeterminate => write!(f, "indeterminate"),
            Outcome::Failed => write!(f, "failed"),
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.ops.len();
        writeln!(
            f,
            "key {:?} is not linearizable; smallest failing sub-history has {n} operation{}:",
            self.key,
            if n == 1 { "" } else { "s" }
        )?;
        let rows: Vec<[String; 5]> = self
            .ops
            .iter()
            .map(|o| {
                let complete = match o.outcome {
                    Outcome::Indeterminate => "?".to_string(),
                    _ => o.complete.to_string(),
                };
                [
                    o.id.to_string(),
                    o.client.to_string(),
                    o.op.to_string(),
                    o.outcome.to_string(),
                    format!("[{}, {complete}]", o.invoke),
                ]
            })
            .collect();
        let width = |c: usize| rows.iter().map(|r| r[c].len()).max().unwrap_or(0);
        let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
        for [id, client, op, outcome, times] in &rows {
            writeln!(
                f,
                "  op {id:>w0$}  client {client:>w1$}  {op:<w2$} -> {outcome:<w3$}  {times}"
            )?;
        }
        write!(f, "{}", self.explanation)
    }
}

// ---------------------------------------------------------------------------
// Top level: validation and partitioning by key
// ---------------------------------------------------------------------------

fn validate(op: &Operation) -> Result<(), String> {
    let consistent = matches!(
        (&op.op, &op.outcome),
        (_, Outcome::Indeterminate | Outcome::Failed)
            | (Op::Read, Outcome::ReadOk(_))
            | (Op::Write(_), Outcome::WriteOk)
            | (Op::Cas { .. }, Outcome::CasOk(_))
    );
    if !consistent {
        return Err(format!(
            "malformed history: op {} ({}) has outcome {:?}, which does not match its kind",
            op.id, op.op, op.outcome
        ));
    }
    let definite = !matches!(op.outcome, Outcome::Indeterminate | Outcome::Failed);
    if definite && op.complete < op.invoke {
        return Err(format!(
            "malformed history: op {} completes at {} before its invocation at {}",
            op.id, op.complete, op.invoke
        ));
    }
    Ok(())
}

/// Failed operations and reads without a result have no effect on the model.
fn is_relevant(op: &Operation) -> bool {
    match op.outcome {
        Outcome::Failed => false,
        Outcome::Indeterminate => !matches!(op.op, Op::Read),
        _ => true,
    }
}

fn check_history(history: &[Operation], per_key: Option<Duration>) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    let mut malformed: BTreeMap<&str, String> = BTreeMap::new();
    for op in history {
        match validate(op) {
            Err(reason) => {
                malformed.entry(&op.key).or_insert(reason);
            }
            Ok(()) if is_relevant(op) => by_key.entry(&op.key).or_default().push(op),
            Ok(()) => {}
        }
    }
    // A key with a malformed operation cannot be checked meaningfully.
    let mut unknown = malformed
        .iter()
        .next()
        .map(|(key, reason)| Verdict::Unknown {
            key: key.to_string(),
            reason: reason.clone(),
        });
    for (key, ops) in &by_key {
        if malformed.contains_key(key) {
            continue;
        }
        match check_key(key, ops, per_key) {
            Verdict::Linearizable => {}
            v @ Verdict::NotLinearizable(_) => return v,
            v @ Verdict::Unknown { .. } => {
                unknown.get_or_insert(v);
            }
        }
    }
    unknown.unwrap_or(Verdict::Linearizable)
}

// ---------------------------------------------------------------------------
// Per-key preparation: value interning and the register model
// ---------------------------------------------------------------------------

/// Interned register value; `NONE` is the absent value (initial state).
type Val = u32;
const NONE: Val = 0;

/// Operation kind over interned values.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Read(Val),
    Write(Val),
    /// `swapped`: Some(outcome) if it completed, None if indeterminate.
    Cas {
        expect: Val,
        new: Val,
        swapped: Option<bool>,
    },
}

/// A prepared (relevant) operation of one key.
#[derive(Clone, Copy, Debug)]
struct POp {
    /// Index into the key's operation list.
    src: usize,
    kind: Kind,
    invoke: u64,
    /// None for indeterminate operations (completion = +infinity).
    complete: Option<u64>,
    /// A non-absent value this operation proves was in the register.
    observes: Option<Val>,
    /// A value this operation may have written.
    writes: Option<Val>,
}

/// Applies `kind` to the register in `state`; None if the operation's outcome
/// is inconsistent with that state. `state_of` maps interned values to model
/// states (see `ValueTable::collapsed`).
fn step(kind: Kind, state: u32, state_of: &[u32]) -> Option<u32> {
    let s = |v: Val| state_of[v as usize];
    match kind {
        Kind::Read(v) => (state == s(v)).then_some(state),
        Kind::Write(v) => Some(s(v)),
        Kind::Cas {
            expect,
            new,
            swapped,
        } => {
            let hit = state == s(expect);
            match swapped {
                Some(true) => hit.then(|| s(new)),
                Some(false) => (!hit).then_some(state),
                // Indeterminate: if it took effect it behaved like a CAS. Not
                // taking effect at all is covered by never linearizing it.
                None => Some(if hit { s(new) } else { state }),
            }
        }
    }
}

struct ValueTable {
    /// Interned value -> value.
    values: Vec<Value>,
    /// Interned value -> model state, with all values that no operation
    /// observes collapsed into the single state `values.len()`.
    collapsed: Vec<u32>,
    /// Interned value -> model state, one state per value (for explanations).
    identity: Vec<u32>,
}

impl ValueTable {
    fn junk(&self) -> u32 {
        self.values.len() as u32
    }

    fn describe(&self, state: u32) -> String {
        match self.values.get(state as usize) {
            Some(v) => show_value(v),
            None => "<a value that no operation observed>".to_string(),
        }
    }
}

fn prepare(ops: &[&Operation]) -> (Vec<POp>, ValueTable) {
    let mut values: Vec<Value> = vec![None];
    let mut ids: HashMap<Value, Val> = HashMap::from([(None, NONE)]);
    let mut intern = |v: &Value| -> Val {
        if let Some(&id) = ids.get(v) {
            return id;
        }
        let id = values.len() as Val;
        values.push(v.clone());
        ids.insert(v.clone(), id);
        id
    };
    let mut observed: HashSet<Val> = HashSet::new();
    let mut pops = Vec::with_capacity(ops.len());
    for (src, op) in ops.iter().enumerate() {
        let (kind, observes, writes) = match (&op.op, &op.outcome) {
            (Op::Read, Outcome::ReadOk(v)) => {
                let v = intern(v);
                observed.insert(v);
                (Kind::Read(v), (v != NONE).then_some(v), None)
            }
            (Op::Write(s), _) => {
                let v = intern(&Some(s.clone()));
                (Kind::Write(v), None, Some(v))
            }
            (Op::Cas { expect, new }, outcome) => {
                let expect = intern(expect);
                let new = intern(&Some(new.clone()));
                observed.insert(expect);
                let swapped = match outcome {
                    Outcome::CasOk(b) => Some(*b),
                    _ => None,
                };
                let kind = Kind::Cas {
                    expect,
                    new,
                    swapped,
                };
                let observes = (swapped == Some(true) && expect != NONE).then_some(expect);
                let writes = (swapped != Some(false)).then_some(new);
                (kind, observes, writes)
            }
            // `validate` and `is_relevant` let nothing else through.
            _ => unreachable!(
                "unexpected operation/outcome pair {:?}",
                (&op.op, &op.outcome)
            ),
        };
        let complete = match op.outcome {
            Outcome::Indeterminate => None,
            _ => Some(op.complete),
        };
        pops.push(POp {
            src,
            kind,
            invoke: op.invoke,
            complete,
            observes,
            writes,
        });
    }
    let junk = values.len() as u32;
    let identity: Vec<u32> = (0..junk).collect();
    let collapsed = identity
        .iter()
        .map(|&v| {
            if v == NONE || observed.contains(&v) {
                v
            } else {
                junk
            }
        })
        .collect();
    let table = ValueTable {
        values,
        collapsed,
        identity,
    };
    (pops, table)
}

// ---------------------------------------------------------------------------
// Sets of linearized operations and the memoisation cache
// ---------------------------------------------------------------------------

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The set of linearized *completed* operations, as a 128-bit fingerprint
/// that is updated in O(1): the exact bitmask while there are at most 128
/// completed operations (always the case while shrinking and explaining),
/// otherwise a Zobrist hash (XOR of a random 128-bit word per member).
///
/// Storing fingerprints instead of bitsets keeps the cache small (a bitset
/// of 10,000 operations is 1.2 KiB per configuration). Two different sets
/// collide with probability 2^-128 per pair, i.e. never in practice (10^7
/// configurations give a probability around 10^-25); a collision could only
/// prune a configuration wrongly.
#[derive(Clone, Copy)]
struct DoneSet {
    fp: u128,
    exact: bool,
}

impl DoneSet {
    fn new(members: usize) -> Self {
        DoneSet {
            fp: 0,
            exact: members <= 128,
        }
    }

    /// Adds or removes operation `i`.
    fn toggle(&mut self, i: usize) {
        self.fp ^= if self.exact {
            1u128 << i
        } else {
            let (hi, lo) = (splitmix64(2 * i as u64), splitmix64(2 * i as u64 + 1));
            (u128::from(hi) << 64) | u128::from(lo)
        };
    }
}

/// Plain bitset (linearized indeterminate operations).
#[derive(Clone, PartialEq, Eq)]
struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    fn new(bits: usize) -> Self {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }

    fn set(&mut self, i: usize) {
        let bit = 1u64 << (i % 64);
        debug_assert_eq!(self.words[i / 64] & bit, 0, "bit {i} already set");
        self.words[i / 64] |= bit;
    }

    fn clear(&mut self, i: usize) {
        let bit = 1u64 << (i % 64);
        debug_assert_ne!(self.words[i / 64] & bit, 0, "bit {i} not set");
        self.words[i / 64] &= !bit;
    }
}

fn is_subset(a: &[u64], b: &[u64]) -> bool {
    // A plain loop: this is hot, and iterator adapters are slow in debug
    // builds.
    for i in 0..a.len().min(b.len()) {
        if a[i] & !b[i] != 0 {
            return false;
        }
    }
    true
}

/// Cheap hasher for keys made of already well-mixed words.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        splitmix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(29) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
}

/// Memoisation key: the linearized completed operations, the model state and,
/// inside a block of indeterminate operations, the state before the block
/// (`NIL` outside a block; see `search`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    done: u128,
    state: u32,
    block: u32,
}

/// Interned sets of linearized indeterminate operations: configurations
/// share the set they were explored with, which changes far less often than
/// the rest of the configuration.
struct SetArena {
    words_per_set: usize,
    words: Vec<u64>,
    /// Content hash -> most recent set with that hash; `same_hash` chains
    /// to the others.
    by_hash: HashMap<u64, u32, BuildHasherDefault<MixHasher>>,
    same_hash: Vec<u32>,
}

impl SetArena {
    fn get(&self, id: u32) -> &[u64] {
        let start = id as usize * self.words_per_set;
        &self.words[start..start + self.words_per_set]
    }

    fn intern(&mut self, set: &[u64]) -> u32 {
        let hash = set
            .iter()
            .fold(0u64, |h, &w| splitmix64(h.rotate_left(7) ^ w));
        let first = self.by_hash.get(&hash).copied().unwrap_or(NIL);
        let mut id = first;
        while id != NIL {
            if self.get(id) == set {
                return id;
            }
            id = self.same_hash[id as usize];
        }
        let id = self.same_hash.len() as u32;
        self.words.extend_from_slice(set);
        self.same_hash.push(first);
        self.by_hash.insert(hash, id);
        id
    }
}

/// Explored configurations: for each key, the sets of linearized
/// indeterminate operations it was explored with, as a linked list of
/// entries in an arena (no per-configuration allocation).
///
/// (K, I) dominates (K, I') if I is a subset of I': indeterminate operations
/// never have to be linearized, so whatever can follow (K, I') can follow
/// (K, I). A configuration outside a block also dominates the same one inside
/// a block, which is only more restricted. Dominated configurations are not
/// explored.
struct Cache {
    heads: HashMap<Key, u32, BuildHasherDefault<MixHasher>>,
    /// Per entry: the next entry of the same key (NIL = end) and its set of
    /// indeterminate operations. Entries dominated by a later one are
    /// unchained.
    entries: Vec<(u32, u32)>,
    sets: SetArena,
}

impl Cache {
    fn new(indeterminate: usize) -> Self {
        Cache {
            heads: HashMap::default(),
            entries: Vec::new(),
            sets: SetArena {
                words_per_set: indeterminate.div_ceil(64),
                words: Vec::new(),
                by_hash: HashMap::default(),
                same_hash: Vec::new(),
            },
        }
    }

    /// Whether (`key`, `indet`) is dominated by an explored configuration.
    /// `indet_id` is the interned id of `indet`, if known.
    fn dominated(&self, key: &Key, indet: &Bitset, indet_id: Option<u32>) -> bool {
        let mut e = self.heads.get(key).copied().unwrap_or(NIL);
        while e != NIL {
            let (next, set) = self.entries[e as usize];
            if Some(set) == indet_id || is_subset(self.sets.get(set), &indet.words) {
                return true;
            }
            e = next;
        }
        false
    }

    /// Records configuration (`key`, `indet`) unless an explored
    /// configuration dominates it. `indet_id` is the interned id of `indet`
    /// if known. Returns the id of `indet` if the configuration is new and
    /// must be explored.
    fn admit(&mut self, key: Key, indet: &Bitset, indet_id: Option<u32>) -> Option<u32> {
        if key.block != NIL && self.dominated(&Key { block: NIL, ..key }, indet, indet_id) {
            return None;
        }
        let mut head = self.heads.get(&key).copied().unwrap_or(NIL);
        if self.dominated(&key, indet, indet_id) {
            return None;
        }
        // Unchain the entries that the new one dominates.
        let (mut prev, mut e) = (NIL, head);
        while e != NIL {
            let (next, set) = self.entries[e as usize];
            if is_subset(&indet.words, self.sets.get(set)) {
                if prev == NIL {
                    head = next;
                } else {
                    self.entries[prev as usize].0 = next;
                }
            } else {
                prev = e;
            }
            e = next;
        }
        let id = match indet_id {
            Some(id) => id,
            None => self.sets.intern(&indet.words),
        };
        let entry = self.entries.len() as u32;
        self.entries.push((head, id));
        self.heads.insert(key, entry);
        Some(id)
    }
}

// ---------------------------------------------------------------------------
// The WGL search
// ---------------------------------------------------------------------------

const NIL: u32 = u32::MAX;

/// Event list node. The call and return events are sorted by time and stored
/// after the list heads (sentinels), so comparing node indices compares
/// positions in time.
#[derive(Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    /// Operation index (into the searched slice); NIL for the sentinels.
    op: u32,
    is_call: bool,
    /// For a call: its return node, or NIL for indeterminate operations.
    ret: u32,
}

/// Head of the list of the calls and returns of completed operations.
const DEF: u32 = 0;
/// Head of the list of indeterminate writes of unobserved values (all
/// interchangeable, see `search`).
const JUNK: u32 = 1;
/// Head of the list of the other indeterminate writes.
const WRITES: u32 = 2;

/// Head of the list of the indeterminate CASes expecting model state `state`.
fn cas_head(state: u32) -> u32 {
    3 + state
}

/// Time-ordered doubly linked lists of events, with lift/unlift. Completed
/// operations (call and return events) form one list; the calls of
/// indeterminate operations, which have no return, are kept in separate lists
/// by kind so that scans neither wade through long-pending indeterminate
/// operations nor look at ones that cannot apply in the current state.
struct EventList {
    nodes: Vec<Node>,
}

impl EventList {
    /// `home[i]`: head of the list of operation `i`; `heads`: number of lists.
    fn new(ops: &[POp], home: &[u32], heads: u32) -> Self {
        // (time, is_return, op): at equal times calls sort before returns, so
        // operations touching at an instant are treated as concurrent.
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(ops.len() * 2);
        for (i, p) in ops.iter().enumerate() {
            events.push((p.invoke, false, i as u32));
            if let Some(c) = p.complete {
                events.push((c, true, i as u32));
            }
        }
        events.sort_unstable();
        let sentinel = Node {
            prev: NIL,
            next: NIL,
            op: NIL,
            is_call: false,
            ret: NIL,
        };
        let mut nodes = vec![sentinel; heads as usize];
        let mut tails: Vec<u32> = (0..heads).collect();
        let mut ret_of = vec![NIL; ops.len()];
        for (pos, &(_, is_return, op)) in events.iter().enumerate() {
            let idx = heads + pos as u32;
            if is_return {
                ret_of[op as usize] = idx;
            }
            let list = home[op as usize] as usize;
            nodes[tails[list] as usize].next = idx;
            nodes.push(Node {
                prev: tails[list],
                next: NIL,
                op,
                is_call: !is_return,
                ret: NIL,
            });
            tails[list] = idx;
        }
        for n in &mut nodes[heads as usize..] {
            if n.is_call {
                n.ret = ret_of[n.op as usize];
            }
        }
        EventList { nodes }
    }

    fn next(&self, i: u32) -> u32 {
        self.nodes[i as usize].next
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        self.nodes[prev as usize].next = next;
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    /// Reinserts a node removed by `unlink`; removals must be undone in
    /// reverse order.
    fn relink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        self.nodes[prev as usize].next = i;
        if next != NIL {
            self.nodes[next as usize].prev = i;
        }
    }

    /// Removes a call and its return (if any) from the lists.
    fn lift(&mut self, call: u32) {
        self.unlink(call);
        let ret = self.nodes[call as usize].ret;
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, call: u32) {
        let ret = self.nodes[call as usize].ret;
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }

    /// The first return event of a pending completed operation: the end of
    /// the window of candidates (NIL if none is pending).
    fn window_end(&self) -> u32 {
        let mut cur = self.next(DEF);
        while cur != NIL && self.nodes[cur as usize].is_call {
            cur = self.next(cur);
        }
        cur
    }

    /// Whether the list `head` has a pending call before `window_end`.
    fn has_candidate(&self, head: u32, window_end: u32) -> bool {
        self.next(head) < window_end
    }
}

/// Where the search got stuck furthest: the return event (latest in time)
/// that was reached before its operation could be linearized.
#[derive(Clone, Debug)]
struct Blocked {
    /// Index of the operation in the searched slice.
    op: usize,
    /// Model states in which the search reached that return.
    states: BTreeSet<u32>,
}

enum SearchResult {
    Linearizable,
    NotLinearizable(Blocked),
    Timeout { explored: usize },
}

/// A linearized operation on the backtracking stack.
struct Frame {
    /// Call node of the operation.
    node: u32,
    /// Configuration before it.
    prev: Key,
    prev_indet_id: u32,
}

/// Segments of the scan for indeterminate candidates, in order: the first
/// pending unobserved write, the other writes, the CASes expecting the
/// current state.
const SEG_JUNK: u8 = 0;
const SEG_WRITES: u8 = 1;
const SEG_CAS: u8 = 2;

fn segment_of(home: u32) -> u8 {
    match home {
        JUNK => SEG_JUNK,
        WRITES => SEG_WRITES,
        _ => SEG_CAS,
    }
}

fn segment_head(segment: u8, state: u32) -> u32 {
    match segment {
        SEG_JUNK => JUNK,
        SEG_WRITES => WRITES,
        _ => cas_head(state),
    }
}

/// Completed candidates that are not enabled in the reference state (the
/// state before the current block of indeterminate operations, or the
/// current state): the only operations that can justify linearizing
/// indeterminate operations now.
fn needy(list: &EventList, ops: &[POp], reference: u32, state_of: &[u32], out: &mut Vec<Kind>) {
    out.clear();
    let mut cur = list.next(DEF);
    while cur != NIL && list.nodes[cur as usize].is_call {
        let kind = ops[list.nodes[cur as usize].op as usize].kind;
        if step(kind, reference, state_of).is_none() {
            out.push(kind);
        }
        cur = list.next(cur);
    }
}

/// Decides whether `ops` (one key) is linearizable from the absent state.
/// `state_of` maps interned values to model states; states are below
/// `state_of.len() + 1`.
///
/// The candidates of a configuration are the operations whose call comes
/// before the first pending return (`window_end`). Completed candidates are
/// tried first, in time order, then indeterminate ones.
///
/// Indeterminate operations are restricted to a normal form, which every
/// linearization can be brought into, to avoid trying every pending
/// indeterminate operation at every dead end:
///
/// * A maximal run ("block") of consecutive indeterminate operations entered
///   in state `b` must be followed by a completed operation that is *not*
///   enabled in `b`. Otherwise, if that operation is a read or a failed CAS,
///   the block can be moved after it (the read/CAS proves the block leaves the
///   state unchanged, resp. cannot tell); if it is a write or a successful
///   CAS, the block is overwritten and can be dropped. A block at the very end
///   can be dropped too.
/// * Inside a block, nothing precedes a write (it would be overwritten), no
///   operation leaves the state unchanged (it can be dropped), and every
///   operation leads to a state in which a completed candidate not enabled in
///   `b` is enabled or a pending CAS can continue the block.
/// * Indeterminate operations with the same effect on the model (e.g. writes
///   of values nobody observed) are interchangeable once both are callable,
///   so only the earliest pending one of each such class is tried.
fn search(ops: &[POp], state_of: &[u32], deadline: Option<Instant>) -> SearchResult {
    let junk = state_of.len() as u32;
    let s = |v: Val| state_of[v as usize];
    // Per operation: bit index (separately for completed and indeterminate
    // operations), home list and symmetry class (model effect).
    let mut bit_index = Vec::with_capacity(ops.len());
    let mut home = Vec::with_capacity(ops.len());
    let mut class = Vec::with_capacity(ops.len());
    let mut classes: HashMap<(bool, u32, u32), u32> = HashMap::new();
    let (mut n_def, mut n_indet) = (0usize, 0usize);
    for p in ops {
        let effect = match p.kind {
            Kind::Read(v) => (false, s(v), u32::MAX),
            Kind::Write(v) => (false, s(v), 0),
            Kind::Cas { expect, new, .. } => (true, s(expect), s(new)),
        };
        let next_class = classes.len() as u32;
        class.push(*classes.entry(effect).or_insert(next_class));
        if p.complete.is_some() {
            bit_index.push(n_def);
            n_def += 1;
            home.push(DEF);
        } else {
            bit_index.push(n_indet);
            n_indet += 1;
            home.push(match p.kind {
                Kind::Write(v) if s(v) == junk => JUNK,
                Kind::Cas { expect, .. } => cas_head(s(expect)),
                // Indeterminate reads are dropped before the search; one
                // would be a no-op anyway.
                _ => WRITES,
            });
        }
    }
    let mut list = EventList::new(ops, &home, cas_head(junk) + 1);
    // class_mark[c] == scan: class c was already tried in the current scan of
    // indeterminate candidates.
    let mut class_mark = vec![0u64; classes.len()];
    let mut scan = 0u64;
    let mut needy_ops: Vec<Kind> = Vec::new();

    let mut done = DoneSet::new(n_def);
    let mut key = Key {
        done: done.fp,
        state: NONE,
        block: NIL,
    };
    let mut indet = Bitset::new(n_indet);
    let mut cache = Cache::new(n_indet);
    let Some(mut indet_id) = cache.admit(key, &indet, None) else {
        unreachable!("the first configuration is new");
    };
    let mut explored = 1usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut remaining = n_def;
    let mut blocked: Option<(u32, BTreeSet<u32>)> = None;

    // Phase 0: `cur` walks the completed operations' list up to the first
    // return. Phase 1: `cur` walks segment `segment` of the indeterminate
    // candidates, up to `window_end`.
    let mut phase1 = false;
    let mut segment = SEG_JUNK;
    let mut window_end = NIL;
    let mut cur = list.next(DEF);
    let mut iterations = 0u64;
    loop {
        if remaining == 0 {
            return SearchResult::Linearizable;
        }
        if iterations.is_multiple_of(1024) && deadline.is_some_and(|d| Instant::now() >= d) {
            return SearchResult::Timeout { explored };
        }
        iterations += 1;

        let in_window = if phase1 {
            cur < window_end && (segment != SEG_JUNK || cur == list.next(JUNK))
        } else {
            cur != NIL && list.nodes[cur as usize].is_call
        };
        if !in_window && phase1 && segment != SEG_CAS {
            segment += 1;
            cur = list.next(segment_head(segment, key.state));
            continue;
        }
        if in_window {
            let i = list.nodes[cur as usize].op as usize;
            let p = &ops[i];
            let mut candidate = None;
            if phase1 {
                let seen = class_mark[class[i] as usize] == scan;
                class_mark[class[i] as usize] = scan;
                if !seen {
                    let useful = |t: u32| {
                        needy_ops.iter().any(|&k| step(k, t, state_of).is_some())
                            || list.has_candidate(cas_head(t), window_end)
                    };
                    let block = if key.block == NIL {
                        key.state
                    } else {
                        key.block
                    };
                    candidate = step(p.kind, key.state, state_of)
                        .filter(|&t| t != key.state && useful(t))
                        .map(|t| (t, block));
                }
            } else if key.block == NIL || step(p.kind, key.block, state_of).is_none() {
                candidate = step(p.kind, key.state, state_of).map(|t| (t, NIL));
            }
            if let Some((next_state, next_block)) = candidate {
                let prev = key;
                if phase1 {
                    indet.set(bit_index[i]);
                } else {
                    done.toggle(bit_index[i]);
                }
                key = Key {
                    done: done.fp,
                    state: next_state,
                    block: next_block,
                };
                // A completed operation leaves the indeterminate set as is.
                let known_id = (!phase1).then_some(indet_id);
                if let Some(id) = cache.admit(key, &indet, known_id) {
                    explored += 1;
                    stack.push(Frame {
                        node: cur,
                        prev,
                        prev_indet_id: indet_id,
                    });
                    indet_id = id;
                    list.lift(cur);
                    if !phase1 {
                        remaining -= 1;
                    }
                    phase1 = false;
                    cur = list.next(DEF);
                    continue;
                }
                key = prev;
                if phase1 {
                    indet.clear(bit_index[i]);
                } else {
                    done.toggle(bit_index[i]);
                }
            }
            cur = list.next(cur);
            continue;
        }

        // End of the completed candidates: try indeterminate ones if they
        // can help.
        if !phase1 {
            window_end = cur;
            if n_indet > 0 {
                let in_block = key.block != NIL;
                let reference = if in_block { key.block } else { key.state };
                needy(&list, ops, reference, state_of, &mut needy_ops);
                if !needy_ops.is_empty() {
                    phase1 = true;
                    scan += 1;
                    // Nothing precedes a write inside a block.
                    segment = if in_block { SEG_CAS } else { SEG_JUNK };
                    cur = list.next(segment_head(segment, key.state));
                    continue;
                }
            }
        }
        // Dead end: remember the furthest return reached, then backtrack.
        if window_end != NIL {
            match &mut blocked {
                Some((pos, states)) if *pos == window_end => {
                    states.insert(key.state);
                }
                Some((pos, _)) if *pos > window_end => {}
                _ => blocked = Some((window_end, BTreeSet::from([key.state]))),
            }
        }
        let Some(frame) = stack.pop() else {
            let (pos, states) = blocked.expect("a failed search reaches a return");
            return SearchResult::NotLinearizable(Blocked {
                op: list.nodes[pos as usize].op as usize,
                states,
            });
        };
        list.unlift(frame.node);
        let i = list.nodes[frame.node as usize].op as usize;
        phase1 = home[i] != DEF;
        if phase1 {
            indet.clear(bit_index[i]);
        } else {
            done.toggle(bit_index[i]);
            remaining += 1;
        }
        key = frame.prev;
        indet_id = frame.prev_indet_id;
        debug_assert!(key.done == done.fp);
        cur = list.next(frame.node);
        if phase1 {
            // Resume the scan of indeterminate candidates after this one:
            // recompute the window, the needy candidates and the classes
            // already tried in this segment.
            window_end = list.window_end();
            let reference = if key.block == NIL {
                key.state
            } else {
                key.block
            };
            needy(&list, ops, reference, state_of, &mut needy_ops);
            segment = segment_of(home[i]);
            scan += 1;
            let mut n = list.next(home[i]);
            while n != cur {
                class_mark[class[list.nodes[n as usize].op as usize] as usize] = scan;
                n = list.next(n);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Per-key check, shrinking and explanation
// ---------------------------------------------------------------------------

fn check_key(key: &str, ops: &[&Operation], per_key: Option<Duration>) -> Verdict {
    let start = Instant::now();
    let deadline = per_key.and_then(|d| start.checked_add(d));
    let (pops, table) = prepare(ops);
    let blocked = match search(&pops, &table.collapsed, deadline) {
        SearchResult::Linearizable => return Verdict::Linearizable,
        SearchResult::Timeout { explored } => {
            return Verdict::Unknown {
                key: key.to_string(),
                reason: format!(
                    "search budget of {:?} exhausted after exploring {explored} configurations \
                     of {} operations",
                    per_key.unwrap_or_default(),
                    pops.len()
                ),
            };
        }
        SearchResult::NotLinearizable(b) => b,
    };

    let shrink_deadline = Instant::now() + SHRINK_BUDGET;
    let minimal = shrink(&pops, &table.collapsed, &blocked, shrink_deadline);

    // Re-run on the small sub-history without collapsing unobserved values,
    // so that the explanation can name them.
    let explain_deadline = Instant::now() + Duration::from_secs(1);
    let (blocked_op, states): (POp, Vec<u32>) =
        match search(&minimal, &table.identity, Some(explain_deadline)) {
            SearchResult::NotLinearizable(b) => (minimal[b.op], b.states.into_iter().collect()),
            // Cannot happen (the two state mappings are equivalent) unless
            // time ran out: fall back to the first search's findings.
            _ => (pops[blocked.op], blocked.states.iter().copied().collect()),
        };
    let state_of = if states.iter().any(|&s| s == table.junk()) {
        &table.collapsed
    } else {
        &table.identity
    };
    let could_apply = states
        .iter()
        .any(|&s| step(blocked_op.kind, s, state_of).is_some());
    let never_written = match blocked_op.kind {
        Kind::Read(v) if v != NONE => !pops.iter().any(|p| p.writes == Some(v)),
        _ => false,
    };
    let states: Vec<String> = states.iter().map(|&s| table.describe(s)).collect();
    let explanation = explain(
        key,
        ops[blocked_op.src],
        &states,
        never_written,
        could_apply,
    );

    let mut anomaly_ops: Vec<Operation> = minimal.iter().map(|p| ops[p.src].clone()).collect();
    anomaly_ops.sort_by_key(|o| (o.invoke, o.id));
    Verdict::NotLinearizable(Anomaly {
        key: key.to_string(),
        ops: anomaly_ops,
        explanation,
    })
}

fn fails(ops: &[POp], state_of: &[u32], deadline: Instant) -> bool {
    matches!(
        search(ops, state_of, Some(deadline)),
        SearchResult::NotLinearizable(_)
    )
}

/// Marks in `keep` the writers (in `pool`) of every value observed by a kept
/// operation, transitively, for the values in `written`.
fn keep_writers(pool: &[POp], keep: &mut [bool], written: &HashSet<Val>) {
    loop {
        let kept = || pool.iter().zip(keep.iter()).filter(|(_, k)| **k);
        let have: HashSet<Val> = kept().filter_map(|(o, _)| o.writes).collect();
        let missing: HashSet<Val> = kept()
            .filter_map(|(o, _)| o.observes)
            .filter(|v| written.contains(v) && !have.contains(v))
            .collect();
        if missing.is_empty() {
            return;
        }
        for (o, k) in pool.iter().zip(keep.iter_mut()) {
            if o.writes.is_some_and(|v| missing.contains(&v)) {
                *k = true;
            }
        }
    }
}

fn select(pool: &[POp], keep: &[bool]) -> Vec<POp> {
    pool.iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(o, _)| *o)
        .collect()
}

/// Shrinks a non-linearizable `ops` to a small non-linearizable subset.
///
/// A value observed by a remaining operation keeps at least one writer (if
/// it has one in `ops`), so the anomaly stays meaningful: a stale read
/// shrinks to the writes and the read, not to "read of an unwritten value".
fn shrink(ops: &[POp], state_of: &[u32], blocked: &Blocked, deadline: Instant) -> Vec<POp> {
    let stuck = ops[blocked.op];
    let written: HashSet<Val> = ops.iter().filter_map(|p| p.writes).collect();
    let well_formed = |sub: &[POp]| {
        let have: HashSet<Val> = sub.iter().filter_map(|p| p.writes).collect();
        sub.iter().all(|p| {
            p.observes
                .is_none_or(|v| !written.contains(&v) || have.contains(&v))
        })
    };

    // 1. Cut after the return the search got stuck on. Every configuration
    //    the search explored had its window of candidates end at or before
    //    that return, so it never looked at operations invoked after it:
    //    without them (except writers that well-formedness requires, which
    //    are invoked after it too) the search explores the very same
    //    configurations and fails the same way, no need to verify.
    let mut cur = match stuck.complete {
        Some(cut) => {
            let mut keep: Vec<bool> = ops.iter().map(|p| p.invoke <= cut).collect();
            keep_writers(ops, &mut keep, &written);
            select(ops, &keep)
        }
        None => ops.to_vec(),
    };

    // 2. Cut before: keep the operations still running at time T or later
    //    (plus the writers of the values they observe), moving T back from
    //    the stuck operation over 1, 2, 4, ... operations until the remainder
    //    fails. Anomalies are usually local, and checking small candidates is
    //    cheap.
    let mut invokes: Vec<u64> = cur.iter().map(|p| p.invoke).collect();
    invokes.sort_unstable();
    let p = invokes.partition_point(|&t| t < stuck.invoke);
    let mut back = 1;
    while back <= p && Instant::now() < deadline {
        let since = invokes[p - back];
        let mut keep: Vec<bool> = cur
            .iter()
            .map(|o| o.complete.unwrap_or(o.invoke) >= since)
            .collect();
        keep_writers(&cur, &mut keep, &written);
        let candidate = select(&cur, &keep);
        if candidate.len() == cur.len() {
            break;
        }
        if fails(&candidate, state_of, deadline) {
            cur = candidate;
            break;
        }
        back *= 2;
    }

    // 3. Greedy removal of chunks of halving size, then of single operations,
    //    until no single operation can be removed (1-minimal) or time is up.
    let mut chunk = (cur.len() / 2).max(1);
    loop {
        let mut removed_any = false;
        let mut i = 0;
        while i < cur.len() {
            if Instant::now() >= deadline {
                return cur;
            }
            let end = (i + chunk).min(cur.len());
            let candidate: Vec<POp> = cur[..i].iter().chain(&cur[end..]).copied().collect();
            if well_formed(&candidate) && fails(&candidate, state_of, deadline) {
                cur = candidate;
                removed_any = true;
            } else {
                i += chunk;
            }
        }
        if chunk > 1 {
            chunk /= 2;
        } else if !removed_any {
            return cur;
        }
    }
}

fn explain(
    key: &str,
    op: &Operation,
    states: &[String],
    never_written: bool,
    could_apply: bool,
) -> String {
    let who = format!(
        "op {} ({} by client {} on key {:?})",
        op.id, op.op, op.client, key
    );
    let held = match states {
        [one] => format!("the register could only hold {one}"),
        _ => {
            const MAX: usize = 8;
            let mut list = states[..states.len().min(MAX)].join(", ");
            if states.len() > MAX {
                list.push_str(&format!(" and {} more", states.len() - MAX));
            }
            format!("the register could only hold one of {{{list}}}")
        }
    };
    let context = "whenever it could take effect (after any valid ordering of the \
                   operations that must precede it)";
    match (&op.op, &op.outcome) {
        (Op::Read, Outcome::ReadOk(v)) if never_written => format!(
            "{who} returned {}, a value never written to key {key:?}",
            show_value(v)
        ),
        (Op::Read, Outcome::ReadOk(v)) if !could_apply => {
            format!("{who} returned {}, but {context} {held}", show_value(v))
        }
        (Op::Cas { expect, .. }, Outcome::CasOk(true)) if !could_apply => format!(
            "{who} reported a successful swap, which requires the register to hold {}, \
             but {context} {held}",
            show_value(expect)
        ),
        (Op::Cas { expect, .. }, Outcome::CasOk(false)) if !could_apply => format!(
            "{who} reported a failed compare, but {context} the register held {}",
            show_value(expect)
        ),
        _ => format!(
            "{who} cannot be linearized: every placement consistent with real time \
             contradicts a later operation; before it {held}"
        ),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    /// History builder assigning sequential ids.
    #[derive(Default)]
    struct Hist {
        ops: Vec<Operation>,
    }

    impl Hist {
        fn push(&mut self, client: usize, key: &str, op: Op, span: (u64, u64), outcome: Outcome) {
            self.ops.push(Operation {
                id: self.ops.len(),
                client,
                key: key.to_string(),
                op,
                invoke: span.0,
                complete: span.1,
                outcome,
            });
        }

        fn write(&mut self, client: usize, key: &str, v: &str, span: (u64, u64)) {
            self.push(client, key, Op::Write(v.into()), span, Outcome::WriteOk);
        }

        fn write_indet(&mut self, client: usize, key: &str, v: &str, invoke: u64) {
            let op = Op::Write(v.into());
            self.push(client, key, op, (invoke, 0), Outcome::Indeterminate);
        }

        fn read(&mut self, client: usize, key: &str, v: Option<&str>, span: (u64, u64)) {
            let outcome = Outcome::ReadOk(v.map(String::from));
            self.push(client, key, Op::Read, span, outcome);
        }

        fn cas(
            &mut self,
            client: usize,
            key: &str,
            (expect, new): (Option<&str>, &str),
            span: (u64, u64),
            outcome: Outcome,
        ) {
            let op = Op::Cas {
                expect: expect.map(String::from),
                new: new.into(),
            };
            self.push(client, key, op, span, outcome);
        }

        fn check(&self) -> Verdict {
            check(&self.ops)
        }
    }

    fn anomaly(v: Verdict) -> Anomaly {
        match v {
            Verdict::NotLinearizable(a) => a,
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    fn assert_linearizable(v: Verdict) {
        match v {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable(a) => panic!("expected Linearizable, got:\n{a}"),
            other => panic!("expected Linearizable, got {other:?}"),
        }
    }

    // --- must reject -------------------------------------------------------

    #[test]
    fn rejects_stale_read() {
        let mut h = Hist::default();
        h.read(9, "other", None, (0, 1));
        h.write(0, "x", "1", (0, 10));
        h.write(1, "x", "2", (20, 30));
        h.read(2, "x", Some("2"), (35, 38));
        h.read(2, "x", Some("1"), (40, 50));
        let a = anomaly(h.check());
        assert_eq!(a.key, "x");
        assert!(a.ops.len() <= 3, "anomaly too large:\n{a}");
        let ids: Vec<usize> = a.ops.iter().map(|o| o.id).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        assert!(a.explanation.contains("op 4"), "{}", a.explanation);
        assert!(a.explanation.contains("\"2\""), "{}", a.explanation);

        let text = a.to_string();
        println!("{text}");
        assert!(text.contains("key \"x\" is not linearizable"));
        assert!(text.contains("write(\"1\")"));
        assert!(text.contains("[40, 50]"));
        assert!(text.contains(&a.explanation));
        assert_eq!(text.lines().count(), 2 + a.ops.len());
    }

    #[test]
    fn rejects_lost_write() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.read(1, "x", None, (20, 30));
        let a = anomaly(h.check());
        assert_eq!(a.ops.len(), 2);
        assert!(a.explanation.contains("absent"), "{}", a.explanation);
    }

    #[test]
    fn rejects_cas_succeeding_twice() {
        let mut h = Hist::default();
        h.write(0, "x", "0", (0, 10));
        h.cas(1, "x", (Some("0"), "1"), (20, 40), Outcome::CasOk(true));
        h.cas(2, "x", (Some("0"), "2"), (25, 45), Outcome::CasOk(true));
        let a = anomaly(h.check());
        assert_eq!(a.ops.len(), 3, "{a}");
        assert!(a.explanation.contains("successful swap"), "{a}");
    }

    #[test]
    fn rejects_read_of_unwritten_value() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.read(1, "x", Some("42"), (5, 30));
        let a = anomaly(h.check());
        assert_eq!(a.ops.len(), 1, "{a}");
        assert!(a.explanation.contains("never written"), "{a}");
    }

    #[test]
    fn rejects_reads_observing_writes_in_opposite_orders() {
        let mut h = Hist::default();
        // Two concurrent writes, still in flight while the reads happen.
        h.write(0, "x", "a", (0, 200));
        h.write(1, "x", "b", (0, 200));
        // Client 2 sees a then b; client 3 sees b then a.
        h.read(2, "x", Some("a"), (10, 20));
        h.read(2, "x", Some("b"), (30, 40));
        h.read(3, "x", Some("b"), (10, 20));
        h.read(3, "x", Some("a"), (30, 40));
        let a = anomaly(h.check());
        println!("{a}");
        assert!(a.ops.len() <= 6);
    }

    #[test]
    fn rejects_flip_flop_of_indeterminate_write() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.write_indet(1, "x", "2", 20);
        h.read(2, "x", Some("2"), (30, 40));
        h.read(2, "x", Some("1"), (50, 60));
        let a = anomaly(h.check());
        assert_eq!(a.ops.len(), 4, "{a}");
        assert!(a.to_string().contains("indeterminate  [20, ?]"), "{a}");
    }

    #[test]
    fn rejects_inconsistent_failed_cas() {
        let mut h = Hist::default();
        h.write(0, "x", "0", (0, 10));
        h.cas(1, "x", (Some("0"), "1"), (20, 30), Outcome::CasOk(false));
        let a = anomaly(h.check());
        assert!(a.explanation.contains("failed compare"), "{a}");
    }

    #[test]
    fn failed_ops_have_no_effect() {
        let mut h = Hist::default();
        h.push(0, "x", Op::Write("1".into()), (0, 10), Outcome::Failed);
        h.read(1, "x", Some("1"), (20, 30));
        anomaly(h.check());

        let mut h = Hist::default();
        h.push(0, "x", Op::Write("1".into()), (0, 10), Outcome::Failed);
        h.push(0, "x", Op::Read, (0, 10), Outcome::Indeterminate);
        h.push(0, "x", Op::Read, (0, 10), Outcome::Failed);
        h.read(1, "x", None, (20, 30));
        assert_linearizable(h.check());
    }

    // --- must accept -------------------------------------------------------

    #[test]
    fn accepts_overlapping_reads_of_concurrent_writes() {
        let mut h = Hist::default();
        // Key x: reads see a, then b.
        h.write(0, "x", "a", (0, 100));
        h.write(1, "x", "b", (0, 100));
        h.read(2, "x", Some("a"), (10, 50));
        h.read(2, "x", Some("b"), (60, 90));
        h.read(3, "x", Some("a"), (10, 30));
        h.read(3, "x", Some("b"), (40, 90));
        // Key y: reads see b, then a, one of them overlapping both writes.
        h.write(0, "y", "a", (0, 100));
        h.write(1, "y", "b", (0, 100));
        h.read(2, "y", Some("b"), (5, 95));
        h.read(3, "y", Some("a"), (50, 60));
        h.read(3, "y", Some("a"), (120, 130));
        assert_linearizable(h.check());
    }

    #[test]
    fn accepts_touching_intervals_as_concurrent() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.read(1, "x", None, (10, 20));
        assert_linearizable(h.check());
    }

    #[test]
    fn accepts_indeterminate_write_that_shows_up_later() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.write_indet(1, "x", "2", 20);
        h.read(2, "x", Some("1"), (30, 40));
        h.read(2, "x", Some("2"), (100, 110));
        h.read(3, "x", Some("2"), (200, 210));
        assert_linearizable(h.check());
    }

    #[test]
    fn accepts_indeterminate_write_that_never_shows_up() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.write_indet(1, "x", "2", 20);
        h.read(2, "x", Some("1"), (100, 110));
        h.read(3, "x", Some("1"), (200, 210));
        assert_linearizable(h.check());
    }

    #[test]
    fn accepts_indeterminate_cas_either_way() {
        let mut h = Hist::default();
        // Applied.
        h.write(0, "x", "0", (0, 10));
        h.cas(1, "x", (Some("0"), "1"), (20, 0), Outcome::Indeterminate);
        h.read(2, "x", Some("1"), (100, 110));
        // Not applied.
        h.write(0, "y", "0", (0, 10));
        h.cas(1, "y", (Some("0"), "1"), (20, 0), Outcome::Indeterminate);
        h.read(2, "y", Some("0"), (100, 110));
        h.cas(2, "y", (Some("0"), "2"), (120, 130), Outcome::CasOk(true));
        // Expectation not met: can only have been a no-op.
        h.cas(1, "z", (Some("0"), "1"), (20, 0), Outcome::Indeterminate);
        h.read(2, "z", None, (100, 110));
        assert_linearizable(h.check());
    }

    #[test]
    fn accepts_chains_of_indeterminate_operations() {
        let mut h = Hist::default();
        // Both indeterminate operations must have taken effect, in order.
        h.write(0, "x", "0", (0, 10));
        h.write_indet(1, "x", "a", 20);
        h.cas(2, "x", (Some("a"), "b"), (30, 0), Outcome::Indeterminate);
        h.read(3, "x", Some("b"), (100, 110));
        // The failed CAS is only explained by the indeterminate write of a
        // value that nobody ever reads.
        h.write(0, "y", "0", (0, 10));
        h.write_indet(1, "y", "z", 20);
        h.cas(2, "y", (Some("0"), "1"), (30, 40), Outcome::CasOk(false));
        h.write(0, "y", "2", (50, 60));
        h.read(3, "y", Some("2"), (70, 80));
        assert_linearizable(h.check());

        // Same for x, but the CAS was invoked before the write.
        let mut h = Hist::default();
        h.write(0, "x", "0", (0, 10));
        h.cas(2, "x", (Some("a"), "b"), (15, 0), Outcome::Indeterminate);
        h.write(1, "x", "a", (20, 25));
        h.read(3, "x", Some("b"), (100, 110));
        assert_linearizable(h.check());
        h.read(3, "x", Some("a"), (120, 130));
        anomaly(h.check());
    }

    #[test]
    fn keys_are_independent() {
        let mut h = Hist::default();
        h.write(0, "x", "1", (0, 10));
        h.read(1, "y", None, (20, 30));
        h.cas(1, "z", (None, "1"), (20, 30), Outcome::CasOk(true));
        h.read(1, "z", Some("1"), (40, 50));
        assert_linearizable(h.check());
        assert_linearizable(check(&[]));
    }

    #[test]
    fn malformed_history_is_unknown() {
        let mut h = Hist::default();
        h.push(0, "x", Op::Read, (0, 10), Outcome::WriteOk);
        assert!(matches!(h.check(), Verdict::Unknown { key, .. } if key == "x"));

        let mut h = Hist::default();
        h.write(0, "x", "1", (10, 5));
        assert!(matches!(h.check(), Verdict::Unknown { key, .. } if key == "x"));

        // A violation on another key still wins.
        h.write(0, "y", "1", (0, 10));
        h.read(1, "y", None, (20, 30));
        assert!(matches!(h.check(), Verdict::NotLinearizable(a) if a.key == "y"));
    }

    // --- generated histories ----------------------------------------------

    /// splitmix64-based PRNG.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            splitmix64(self.0)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Event {
        Invoke { client: usize },
        Apply { op: usize },
        Complete { op: usize },
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Ok,
        Indeterminate,
        Failed,
    }

    /// Simulates `clients` clients issuing `total` operations against an
    /// atomic key-value store (each operation takes effect at a random
    /// instant inside its interval). About 3% of writes/CASes time out (half
    /// of them still take effect, possibly long after the timeout) and 1%
    /// fail cleanly.
    fn simulate(
        seed: u64,
        keys: usize,
        clients: usize,
        total: usize,
        indet_permille: u64,
    ) -> Vec<Operation> {
        let mut rng = Rng(seed);
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |heap: &mut BinaryHeap<_>, t: u64, e: Event| {
            seq += 1;
            heap.push(Reverse((t, seq, e)));
        };
        let mut ops: Vec<Operation> = Vec::new();
        let mut fates: Vec<Fate> = Vec::new();
        let mut results: Vec<Option<Outcome>> = Vec::new();
        let mut store: HashMap<String, Value> = HashMap::new();
        let mut seen: Vec<HashMap<String, Value>> = vec![HashMap::new(); clients];
        let mut recent: HashMap<String, Vec<String>> = HashMap::new();
        for client in 0..clients {
            let t = rng.below(10_000);
            push(&mut heap, t, Event::Invoke { client });
        }
        while let Some(Reverse((t, _, event))) = heap.pop() {
            match event {
                Event::Invoke { client } => {
                    if ops.len() == total {
                        continue;
                    }
                    let id = ops.len();
                    let key = format!("k{}", rng.below(keys as u64));
                    let fresh = format!("c{client}-{id}");
                    let op = match rng.below(100) {
                        0..50 => Op::Read,
                        50..75 => Op::Write(fresh),
                        _ => {
                            let expect = if rng.below(100) < 70 {
                                seen[client].get(&key).cloned().flatten()
                            } else {
                                let r = recent.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                                let n = r.len().min(5) as u64;
                                match rng.below(n + 1) {
                                    0 => None,
                                    i => Some(r[r.len() - i as usize].clone()),
                                }
                            };
                            Op::Cas { expect, new: fresh }
                        }
                    };
                    let mut latency = 50_000 + rng.below(1_000_000);
                    if rng.below(100) < 5 {
                        latency += rng.below(5_000_000);
                    }
                    let fate = match rng.below(1000) {
                        _ if op == Op::Read => Fate::Ok,
                        x if x < indet_permille => Fate::Indeterminate,
                        x if x < indet_permille + 10 => Fate::Failed,
                        _ => Fate::Ok,
                    };
                    match fate {
                        Fate::Ok => push(
                            &mut heap,
                            t + 1 + rng.below(latency - 1),
                            Event::Apply { op: id },
                        ),
                        Fate::Indeterminate if rng.below(2) == 0 => push(
                            &mut heap,
                            t + 1 + rng.below(3 * latency),
                            Event::Apply { op: id },
                        ),
                        _ => {}
                    }
                    push(&mut heap, t + latency, Event::Complete { op: id });
                    ops.push(Operation {
                        id,
                        client,
                        key,
                        op,
                        invoke: t,
                        complete: t + latency,
                        outcome: Outcome::Failed,
                    });
                    fates.push(fate);
                    results.push(None);
                }
                Event::Apply { op: id } => {
                    let o = &ops[id];
                    let cur = store.entry(o.key.clone()).or_default();
                    let outcome = match &o.op {
                        Op::Read => Outcome::ReadOk(cur.clone()),
                        Op::Write(v) => {
                            *cur = Some(v.clone());
                            recent.entry(o.key.clone()).or_default().push(v.clone());
                            Outcome::WriteOk
                        }
                        Op::Cas { expect, new } => {
                            let hit = cur == expect;
                            if hit {
                                *cur = Some(new.clone());
                                recent.entry(o.key.clone()).or_default().push(new.clone());
                            }
                            Outcome::CasOk(hit)
                        }
                    };
                    results[id] = Some(outcome);
                }
                Event::Complete { op: id } => {
                    let outcome = match fates[id] {
                        Fate::Ok => results[id].clone().expect("applied before completion"),
                        Fate::Indeterminate => Outcome::Indeterminate,
                        Fate::Failed => Outcome::Failed,
                    };
                    let o = &mut ops[id];
                    let learned = match (&o.op, &outcome) {
                        (_, Outcome::ReadOk(v)) => Some(v.clone()),
                        (Op::Write(v), Outcome::WriteOk) => Some(Some(v.clone())),
                        (Op::Cas { new, .. }, Outcome::CasOk(true)) => Some(Some(new.clone())),
                        _ => None,
                    };
                    if let Some(v) = learned {
                        seen[o.client].insert(o.key.clone(), v);
                    }
                    o.outcome = outcome;
                    let client = o.client;
                    push(&mut heap, t + rng.below(20_000), Event::Invoke { client });
                }
            }
        }
        ops
    }

    fn stats(ops: &[Operation]) -> String {
        let count = |f: &dyn Fn(&Operation) -> bool| ops.iter().filter(|o| f(o)).count();
        format!(
            "{} ops: {} indeterminate, {} failed, {} cas swapped, {} cas not swapped",
            ops.len(),
            count(&|o| o.outcome == Outcome::Indeterminate),
            count(&|o| o.outcome == Outcome::Failed),
            count(&|o| o.outcome == Outcome::CasOk(true)),
            count(&|o| o.outcome == Outcome::CasOk(false)),
        )
    }

    #[test]
    fn accepts_generated_10k_history() {
        for (seed, keys, clients) in [(1, 10, 10), (2, 10, 5), (3, 10, 8)] {
            let history = simulate(seed, keys, clients, 10_000, 30);
            let start = Instant::now();
            let verdict = check(&history);
            let elapsed = start.elapsed();
            eprintln!(
                "seed {seed}, {keys} keys, {clients} clients, {}: checked in {elapsed:?}",
                stats(&history)
            );
            assert_linearizable(verdict);
            assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
        }
    }

    #[test]
    fn accepts_generated_single_key_histories() {
        // Much higher per-key concurrency: 10 clients on one key, with 3% and
        // 10% of the writes/CASes timing out.
        for (total, indet_permille) in [(5_000, 30), (2_000, 100)] {
            let history = simulate(4, 1, 10, total, indet_permille);
            let start = Instant::now();
            let verdict = check(&history);
            let elapsed = start.elapsed();
            eprintln!(
                "1 key, 10 clients, {}: checked in {elapsed:?}",
                stats(&history)
            );
            assert_linearizable(verdict);
            assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
        }
    }

    #[test]
    fn rejects_generated_history_with_injected_stale_read() {
        let mut history = simulate(5, 10, 8, 10_000, 30);
        let on_k0 = |o: &&Operation| o.key == "k0";
        let w1 = history
            .iter()
            .filter(on_k0)
            .find(|o| o.outcome == Outcome::WriteOk)
            .cloned()
            .expect("a write");
        let w2 = history
            .iter()
            .filter(on_k0)
            .find(|o| o.outcome == Outcome::WriteOk && o.invoke > w1.complete)
            .cloned()
            .expect("a later write");
        let stale = Some(match &w1.op {
            Op::Write(v) => v.clone(),
            _ => unreachable!(),
        });
        // The last read of k0 that follows w2: make it return w1's value.
        let read = history
            .iter_mut()
            .filter(|o| o.key == "k0" && o.invoke > w2.complete)
            .filter(|o| matches!(o.outcome, Outcome::ReadOk(_)))
            .last()
            .expect("a late read");
        assert_ne!(read.outcome, Outcome::ReadOk(stale.clone()));
        read.outcome = Outcome::ReadOk(stale);
        let read_id = read.id;

        let start = Instant::now();
        let a = anomaly(check(&history));
        let elapsed = start.elapsed();
        eprintln!("injected stale read found in {elapsed:?}:\n{a}");
        assert_eq!(a.key, "k0");
        assert!(a.ops.iter().any(|o| o.id == read_id));
        assert!(a.ops.len() <= 4, "{a}");
        assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    }

    #[test]
    fn zero_budget_is_unknown() {
        let history = simulate(6, 2, 5, 500, 30);
        assert!(matches!(
            check_with_budget(&history, Duration::ZERO),
            Verdict::Unknown { .. }
        ));
        assert_linearizable(check_with_budget(&history, Duration::from_secs(60)));
    }

    // --- cross-check against a brute-force oracle ----------------------------

    /// Brute force: is there an order of the completed operations and of some
    /// subset of the indeterminate ones that respects real time and is legal
    /// for the register?
    fn brute_force(history: &[Operation]) -> bool {
        fn legal(order: &[&Operation]) -> bool {
            let mut state: Value = None;
            for o in order {
                match (&o.op, &o.outcome) {
                    (Op::Read, Outcome::ReadOk(v)) if *v != state => return false,
                    (Op::Read, _) => {}
                    (Op::Write(v), _) => state = Some(v.clone()),
                    (Op::Cas { expect, new }, outcome) => {
                        let hit = state == *expect;
                        match outcome {
                            Outcome::CasOk(swapped) if *swapped != hit => return false,
                            Outcome::CasOk(false) => {}
                            _ if hit => state = Some(new.clone()),
                            _ => {}
                        }
                    }
                }
            }
            true
        }
        fn precedes(a: &Operation, b: &Operation) -> bool {
            a.outcome != Outcome::Indeterminate && a.complete < b.invoke
        }
        fn extend<'a>(rest: &mut Vec<&'a Operation>, order: &mut Vec<&'a Operation>) -> bool {
            if rest.is_empty() {
                return true;
            }
            for i in 0..rest.len() {
                let o = rest[i];
                if rest.iter().any(|r| precedes(r, o)) {
                    continue;
                }
                rest.remove(i);
                order.push(o);
                let found = legal(order) && extend(rest, order);
                order.pop();
                rest.insert(i, o);
                if found {
                    return true;
                }
            }
            false
        }
        let relevant: Vec<&Operation> = history.iter().filter(|o| is_relevant(o)).collect();
        let (definite, indeterminate): (Vec<&Operation>, Vec<&Operation>) = relevant
            .into_iter()
            .partition(|o| o.outcome != Outcome::Indeterminate);
        (0..1u32 << indeterminate.len()).any(|mask| {
            let mut rest = definite.clone();
            for (i, o) in indeterminate.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    rest.push(o);
                }
            }
            extend(&mut rest, &mut Vec::new())
        })
    }

    /// Small random single-key history with heavy overlap. Writes use five
    /// values but reads and CAS expectations only three, so that some
    /// written values are never observed.
    fn random_history(rng: &mut Rng, n: usize) -> Vec<Operation> {
        const VALUES: [&str; 5] = ["a", "b", "c", "d", "e"];
        let any = |rng: &mut Rng, k: u64| {
            (rng.below(4) != 0).then(|| VALUES[rng.below(k) as usize].to_string())
        };
        (0..n)
            .map(|id| {
                let invoke = rng.below(20);
                let complete = invoke + rng.below(8);
                let op = match rng.below(3) {
                    0 => Op::Read,
                    1 => Op::Write(VALUES[rng.below(5) as usize].into()),
                    _ => Op::Cas {
                        expect: any(rng, 3),
                        new: VALUES[rng.below(5) as usize].into(),
                    },
                };
                let outcome = match (rng.below(100), &op) {
                    (0..20, _) => Outcome::Indeterminate,
                    (20..25, _) => Outcome::Failed,
                    (_, Op::Read) => Outcome::ReadOk(any(rng, 3)),
                    (_, Op::Write(_)) => Outcome::WriteOk,
                    (_, Op::Cas { .. }) => Outcome::CasOk(rng.below(2) == 0),
                };
                Operation {
                    id,
                    client: id,
                    key: "x".into(),
                    op,
                    invoke,
                    complete,
                    outcome,
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_random_histories() {
        let mut rng = Rng(7);
        let (mut yes, mut no) = (0, 0);
        for case in 0..20_000 {
            let n = 1 + rng.below(8) as usize;
            let history = random_history(&mut rng, n);
            let expected = brute_force(&history);
            match check(&history) {
                Verdict::Linearizable => {
                    assert!(expected, "case {case}: false negative for {history:#?}");
                    yes += 1;
                }
                Verdict::NotLinearizable(a) => {
                    assert!(!expected, "case {case}: false positive:\n{a}\n{history:#?}");
                    assert!(
                        !brute_force(&a.ops),
                        "case {case}: anomaly is linearizable:\n{a}"
                    );
                    no += 1;
                }
                Verdict::Unknown { reason, .. } => panic!("case {case}: {reason}"),
            }
        }
        eprintln!("{yes} linearizable, {no} not");
        assert!(yes > 2_000 && no > 2_000);
    }
}
