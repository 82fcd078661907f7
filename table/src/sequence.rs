//! Ordering index revisions: the `sequence` of an index and the rule a reader applies to it.
//!
//! `revision` is a content hash: it tells *whether* two tables differ, not which is newer. The index therefore
//! also carries a `sequence` (u64) that the writer increases with every revision it publishes, and a reader never
//! goes back to a lower one. That guards proxies against being handed an older state, e.g. by an API server whose
//! watch cache lags behind after a reconnect, or by a writer that lost its lease.
//!
//! - **Writer** ([`next_sequence`]): the sequence of the index being replaced plus one; 1 when there is no index.
//!   When an index exists but cannot be read, the current Unix time in milliseconds (far above any `+1` chain
//!   started from 1, so readers accept it; still increasing if it happens again later).
//! - **Reader** ([`judge`]): the order is per index **object** (`metadata.uid`). For the same object a higher
//!   sequence is newer; the same sequence and revision is the table already applied; a lower sequence is refused
//!   (the reader keeps what it has); the same sequence with another revision is a second writer and is refused too.
//!   A new object (a recreated index, another uid) starts a new order: its first revision is accepted whatever its
//!   sequence. Indexes written before the sequence existed read as 0; between two such indexes the revision alone
//!   decides (so an older controller keeps working), and once a reader has applied a sequenced index, an unsequenced
//!   one of the same object is older.

use crate::shard::IndexDoc;
use jiff::Timestamp;

/// What a writer found where it is about to write the index.
#[derive(Debug, Clone, Copy)]
pub enum PreviousIndex<'a> {
    /// No index ConfigMap.
    Absent,
    /// An index whose `index.json` parses.
    Readable(&'a IndexDoc),
    /// An index ConfigMap whose `index.json` is missing or does not parse.
    Unreadable,
}

/// The sequence of the next index revision (see the module documentation).
pub fn next_sequence(previous: PreviousIndex<'_>, now: Timestamp) -> u64 {
    match previous {
        PreviousIndex::Absent => 1,
        PreviousIndex::Readable(doc) => doc.sequence.saturating_add(1),
        PreviousIndex::Unreadable => u64::try_from(now.as_millisecond()).unwrap_or(0).max(1),
    }
}

/// An index revision as a reader sees it: which object, which sequence, which content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `metadata.uid` of the index ConfigMap (any stable identity of the source, e.g. a path, elsewhere).
    pub uid: String,
    pub sequence: u64,
    pub revision: String,
}

/// A reader's verdict on a candidate index revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than what was applied, or the first revision of this index object: apply it.
    Newer,
    /// The revision already applied (same object, sequence and revision).
    Same,
    /// A lower sequence of the same object: refuse it and keep the current table.
    Older,
    /// The same sequence with other content (two writers): refuse it and keep the current table.
    Conflict,
}

/// Judges `candidate` against the last applied revision `last` (see the module documentation).
pub fn judge(last: Option<&Seen>, candidate: &Seen) -> Verdict {
    let Some(last) = last.filter(|l| l.uid == candidate.uid) else { return Verdict::Newer };
    match candidate.sequence.cmp(&last.sequence) {
        std::cmp::Ordering::Greater => Verdict::Newer,
        std::cmp::Ordering::Less => Verdict::Older,
        std::cmp::Ordering::Equal if candidate.revision == last.revision => Verdict::Same,
        std::cmp::Ordering::Equal if candidate.sequence == 0 => Verdict::Newer,
        std::cmp::Ordering::Equal => Verdict::Conflict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;
    use crate::shard::{MAX_SHARD_BYTES, render};

    fn seen(uid: &str, sequence: u64, revision: &str) -> Seen {
        Seen { uid: uid.into(), sequence, revision: revision.into() }
    }

    #[test]
    fn writer_counts_up_from_the_index_it_replaces() {
        let now: Timestamp = "2026-05-01T00:00:00Z".parse().unwrap();
        assert_eq!(next_sequence(PreviousIndex::Absent, now), 1);
        let idx = render(&sample(2), "i", crate::shard::Previous::NONE, 41, MAX_SHARD_BYTES).unwrap().index;
        assert_eq!(next_sequence(PreviousIndex::Readable(&idx), now), 42);
        let legacy = IndexDoc { sequence: 0, ..idx.clone() };
        assert_eq!(next_sequence(PreviousIndex::Readable(&legacy), now), 1);
        let max = IndexDoc { sequence: u64::MAX, ..idx };
        assert_eq!(next_sequence(PreviousIndex::Readable(&max), now), u64::MAX, "saturates, never wraps to 0");

        // Unreadable: time-based, above any plausible +1 chain, and later calls give larger values.
        let a = next_sequence(PreviousIndex::Unreadable, now);
        assert_eq!(a, 1_777_593_600_000);
        let later: Timestamp = "2026-05-01T00:00:01Z".parse().unwrap();
        assert!(next_sequence(PreviousIndex::Unreadable, later) > a);
        let before_epoch: Timestamp = "1969-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(next_sequence(PreviousIndex::Unreadable, before_epoch), 1);
    }

    #[test]
    fn reader_never_goes_back() {
        let last = seen("u1", 5, "aaaa");
        assert_eq!(judge(None, &seen("u1", 0, "x")), Verdict::Newer, "the first one is always taken");
        assert_eq!(judge(Some(&last), &seen("u1", 6, "bbbb")), Verdict::Newer);
        assert_eq!(judge(Some(&last), &seen("u1", 5, "aaaa")), Verdict::Same);
        assert_eq!(judge(Some(&last), &seen("u1", 4, "cccc")), Verdict::Older);
        assert_eq!(judge(Some(&last), &seen("u1", 4, "aaaa")), Verdict::Older, "old content, old sequence");
        assert_eq!(judge(Some(&last), &seen("u1", 5, "dddd")), Verdict::Conflict);
        assert_eq!(judge(Some(&last), &seen("u1", 0, "eeee")), Verdict::Older, "unsequenced after sequenced");
    }

    #[test]
    fn a_recreated_index_starts_a_new_order() {
        let last = seen("u1", 900, "aaaa");
        assert_eq!(judge(Some(&last), &seen("u2", 1, "bbbb")), Verdict::Newer);
    }

    #[test]
    fn unsequenced_indexes_from_older_writers_are_ordered_by_arrival() {
        let last = seen("u1", 0, "aaaa");
        assert_eq!(judge(Some(&last), &seen("u1", 0, "bbbb")), Verdict::Newer);
        assert_eq!(judge(Some(&last), &seen("u1", 0, "aaaa")), Verdict::Same);
        assert_eq!(judge(Some(&last), &seen("u1", 1, "cccc")), Verdict::Newer, "an upgraded writer takes over");
    }
}
