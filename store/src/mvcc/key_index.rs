//! The history of one key: which revisions wrote it, grouped into generations.
//!
//! A generation runs from the put that creates a key to the delete that ends it. Reading a key
//! at a revision means finding the generation alive then and the last write in it at or before
//! that revision. This is etcd's `keyIndex` model; the values themselves live in the backend,
//! addressed by revision.

use super::Revision;

/// All retained revisions of one key, oldest generation first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyIndex {
    generations: Vec<Generation>,
    /// What a write needs to know of the current value, while the key exists.
    live: Option<Live>,
}

/// The current value's create revision, version and lease: kept in the index so that a put,
/// a lease check or a compare on them needs no read of the value itself (compaction forgets the
/// writes these could otherwise be counted from).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Generation {
    /// Writes in revision order; when `ended`, the last one is the tombstone.
    revs: Vec<Revision>,
    ended: bool,
}

impl KeyIndex {
    /// Records a put at `rev` of a value described by `live`, starting a new generation if
    /// the key was absent.
    pub fn put(&mut self, rev: Revision, live: Live) {
        match self.generations.last_mut() {
            Some(generation) if !generation.ended => generation.revs.push(rev),
            _ => self.generations.push(Generation {
                revs: vec![rev],
                ended: false,
            }),
        }
        self.live = Some(live);
    }

    /// The current value's create revision, version and lease, if the key exists now.
    pub fn live(&self) -> Option<Live> {
        self.latest().and(self.live)
    }

    /// Records a delete at `rev`, ending the live generation.
    ///
    /// When there is no live generation (possible only while rebuilding from a partly compacted
    /// history), the tombstone forms a generation of its own, which compaction later drops.
    pub fn tombstone(&mut self, rev: Revision) {
        self.live = None;
        match self.generations.last_mut() {
            Some(generation) if !generation.ended => {
                generation.revs.push(rev);
                generation.ended = true;
            }
            _ => self.generations.push(Generation {
                revs: vec![rev],
                ended: true,
            }),
        }
    }

    /// The revision of the value visible at main revision `at`, or `None` if the key did not
    /// exist then.
    pub fn get(&self, at: i64) -> Option<Revision> {
        for generation in self.generations.iter().rev() {
            let first = generation.revs.first()?;
            if first.main > at {
                continue;
            }
            let pos = generation.revs.partition_point(|r| r.main <= at);
            // pos >= 1 because first.main <= at.
            let idx = pos - 1;
            let is_tombstone = generation.ended && idx == generation.revs.len() - 1;
            return if is_tombstone {
                None
            } else {
                Some(generation.revs[idx])
            };
        }
        None
    }

    /// The revision of the current value, if the key exists now.
    pub fn latest(&self) -> Option<Revision> {
        let generation = self.generations.last()?;
        if generation.ended {
            None
        } else {
            generation.revs.last().copied()
        }
    }

    /// True once compaction has removed every generation; the key can be forgotten.
    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// The main revision of this key's oldest write at or after `at`, if any: a compaction at
    /// a later point has something of this key to forget only if one exists.
    pub fn first_write_since(&self, at: i64) -> Option<i64> {
        self.generations
            .iter()
            .find_map(|g| g.revs.iter().find(|r| r.main >= at))
            .map(|r| r.main)
    }

    /// Forgets history strictly before main revision `at`, appending the revisions it forgets
    /// to `removed`: the caller deletes exactly those records from the backend.
    ///
    /// Afterwards a read at any revision `>= at` gives the same answer as before: the last
    /// write before `at` of a generation still alive at `at` is kept, since it is the value
    /// seen at `at`.
    pub fn compact(&mut self, at: i64, removed: &mut Vec<Revision>) {
        self.generations.retain_mut(|generation| {
            let Some(last) = generation.revs.last() else {
                return false;
            };
            if generation.ended && last.main < at {
                // The key was deleted before `at`: nothing of this generation is visible.
                removed.append(&mut generation.revs);
                return false;
            }
            let below = generation.revs.partition_point(|r| r.main < at);
            if below > 1 {
                removed.extend(generation.revs.drain(..below - 1));
            }
            true
        });
    }

    /// Every retained revision, for tests and consistency checks.
    #[cfg(test)]
    pub fn revisions(&self) -> Vec<Revision> {
        self.generations
            .iter()
            .flat_map(|g| g.revs.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// put@2 put@4 delete@6 put@8
    fn sample() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(r(2), Live::default());
        ki.put(r(4), Live::default());
        ki.tombstone(r(6));
        ki.put(r(8), Live::default());
        ki
    }

    #[test]
    fn get_sees_the_value_of_each_point_in_history() {
        let ki = sample();
        assert_eq!(ki.get(1), None);
        assert_eq!(ki.get(2), Some(r(2)));
        assert_eq!(ki.get(3), Some(r(2)));
        assert_eq!(ki.get(5), Some(r(4)));
        assert_eq!(ki.get(6), None, "deleted at 6");
        assert_eq!(ki.get(7), None);
        assert_eq!(ki.get(8), Some(r(8)));
        assert_eq!(ki.get(100), Some(r(8)));
        assert_eq!(ki.latest(), Some(r(8)));
    }

    #[test]
    fn compaction_keeps_answers_at_and_after_the_compact_revision() {
        for at in 1..=10 {
            let before = sample();
            let mut after = sample();
            let mut removed = Vec::new();
            after.compact(at, &mut removed);
            for read in at..=10 {
                assert_eq!(
                    after.get(read),
                    before.get(read),
                    "compact {at}, read {read}"
                );
            }
            assert!(
                removed.iter().all(|r| r.main < at),
                "compact {at} removed {removed:?}: only revisions below the compact point go"
            );
            let mut all = after.revisions();
            all.extend(&removed);
            all.sort();
            assert_eq!(
                all,
                before.revisions(),
                "compact {at}: every revision is either kept or reported removed, once"
            );
        }
    }

    #[test]
    fn compaction_drops_deleted_generations_and_superseded_writes() {
        let mut ki = sample();
        let mut removed = Vec::new();
        ki.compact(7, &mut removed);
        assert_eq!(ki.revisions(), vec![r(8)]);
        assert_eq!(removed, vec![r(2), r(4), r(6)]);

        let mut ki = sample();
        let mut removed = Vec::new();
        ki.compact(5, &mut removed);
        assert_eq!(ki.revisions(), vec![r(4), r(6), r(8)]);
        assert_eq!(removed, vec![r(2)]);
    }

    #[test]
    fn first_write_since_tells_when_a_later_compaction_can_change_the_key() {
        let ki = sample();
        assert_eq!(ki.first_write_since(0), Some(2));
        assert_eq!(ki.first_write_since(5), Some(6));
        assert_eq!(ki.first_write_since(8), Some(8));
        assert_eq!(ki.first_write_since(9), None);
        let mut compacted = sample();
        compacted.compact(9, &mut Vec::new());
        assert_eq!(compacted.revisions(), vec![r(8)]);
        for at in 10..20 {
            let mut again = compacted.clone();
            let mut removed = Vec::new();
            again.compact(at, &mut removed);
            assert!(removed.is_empty() && again == compacted, "compact {at}");
        }
    }

    #[test]
    fn a_key_deleted_before_the_compact_point_disappears() {
        let mut ki = KeyIndex::default();
        ki.put(r(1), Live::default());
        ki.tombstone(r(2));
        let mut removed = Vec::new();
        ki.compact(3, &mut removed);
        assert!(ki.is_empty());
        assert_eq!(removed, vec![r(1), r(2)]);
    }

    #[test]
    fn a_lone_tombstone_from_a_partial_rebuild_reads_as_absent() {
        let mut ki = KeyIndex::default();
        ki.tombstone(r(5));
        assert_eq!(ki.get(5), None);
        assert_eq!(ki.latest(), None);
        ki.put(r(7), Live::default());
        assert_eq!(ki.get(7), Some(r(7)));
        let mut removed = Vec::new();
        ki.compact(6, &mut removed);
        assert_eq!(removed, vec![r(5)]);
        assert_eq!(ki.revisions(), vec![r(7)]);
    }
}
