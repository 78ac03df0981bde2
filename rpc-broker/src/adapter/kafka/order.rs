//! Reading a partition in offset order across a broker's gaps.
//!
//! A broker gives each record its offset when the produce arrives and may store it a moment later. tansu
//! (0.6, every storage engine) does so: a fetch made in between sees the offset below the high watermark but
//! not its record, returns the records above it, and the consumer's position moves past the missing one for
//! good. Two producers writing to one partition at once (two workers answering one client's inbox) lose a
//! record that way now and then, more often with the CPU saturated. So each partition is read strictly in
//! order: a record past the next expected offset is not handed out; the partition is read again from the
//! missing offset until its record is there, for at most [`GAP_WAIT`]. A gap that lasts longer is taken as
//! one the log really has (a transaction's marker, a compacted record) and skipped.

use std::time::{Duration, Instant};

/// How long a missing offset is waited for before the records above it are read without it.
pub(super) const GAP_WAIT: Duration = Duration::from_secs(2);
/// The pause between two reads of a partition from its missing offset.
pub(super) const GAP_RETRY: Duration = Duration::from_millis(5);

/// What to do with a record just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Hand it out: it is the next one.
    Take,
    /// Drop it: it was handed out already, or it lies past a gap and is read again once the gap is filled.
    Skip,
    /// Drop it and read the partition again from this offset, the first one missing.
    Reread(i64),
}

/// The order of one partition's records: the next offset expected, and the gap before a record read past it.
#[derive(Clone, Debug)]
pub(super) struct InOrder {
    /// The next offset to hand out; none until the first record when where reading starts is not known.
    next: Option<i64>,
    gap: Option<Gap>,
}

#[derive(Clone, Copy, Debug)]
struct Gap {
    /// When the missing offset was first found missing.
    since: Instant,
    /// When the partition was last read again from it.
    reread_at: Instant,
}

impl InOrder {
    /// A partition read from offset `start`, or from wherever the first record read is.
    pub(super) fn starting_at(start: Option<i64>) -> InOrder {
        InOrder { next: start.filter(|offset| *offset >= 0), gap: None }
    }

    /// Whether the record at `offset`, read at `now`, is handed out.
    pub(super) fn admit(&mut self, offset: i64, now: Instant) -> Admit {
        let Some(next) = self.next else {
            self.next = Some(offset + 1);
            return Admit::Take;
        };
        if offset < next {
            return Admit::Skip;
        }
        if offset == next {
            self.next = Some(offset + 1);
            self.gap = None;
            return Admit::Take;
        }
        match &mut self.gap {
            None => {
                self.gap = Some(Gap { since: now, reread_at: now });
                Admit::Reread(next)
            }
            Some(gap) if now.saturating_duration_since(gap.since) >= GAP_WAIT => {
                tracing::debug!(missing = next, read = offset, "a gap in a partition outlasted the wait; read past it");
                self.next = Some(offset + 1);
                self.gap = None;
                Admit::Take
            }
            Some(gap) if now.saturating_duration_since(gap.reread_at) >= GAP_RETRY => {
                gap.reread_at = now;
                Admit::Reread(next)
            }
            Some(_) => Admit::Skip,
        }
    }

    /// The offset to read the partition again from at `now`, when a gap is open and its retry is due (the
    /// records past the gap may all have been read and dropped, so none would come to ask).
    pub(super) fn reread_due(&mut self, now: Instant) -> Option<i64> {
        let next = self.next?;
        let gap = self.gap.as_mut()?;
        (now.saturating_duration_since(gap.reread_at) >= GAP_RETRY).then(|| {
            gap.reread_at = now;
            next
        })
    }

    /// Whether a gap is open: the reader should look again within [`GAP_RETRY`].
    pub(super) fn waiting(&self) -> bool {
        self.gap.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_are_taken_and_repeats_skipped() {
        let now = Instant::now();
        let mut order = InOrder::starting_at(Some(0));
        assert_eq!(order.admit(0, now), Admit::Take);
        assert_eq!(order.admit(1, now), Admit::Take);
        assert_eq!(order.admit(1, now), Admit::Skip);
        assert_eq!(order.admit(0, now), Admit::Skip);
        assert_eq!(order.admit(2, now), Admit::Take);
        assert!(!order.waiting());
    }

    #[test]
    fn without_a_start_the_first_record_read_is_where_reading_starts() {
        let now = Instant::now();
        let mut order = InOrder::starting_at(None);
        assert_eq!(order.admit(40, now), Admit::Take);
        assert_eq!(order.admit(42, now), Admit::Reread(41));
        let mut order = InOrder::starting_at(Some(-1));
        assert_eq!(order.admit(7, now), Admit::Take);
    }

    #[test]
    fn a_record_past_a_gap_waits_until_the_missing_one_is_read() {
        let start = Instant::now();
        let mut order = InOrder::starting_at(Some(5));
        assert_eq!(order.admit(6, start), Admit::Reread(5));
        assert!(order.waiting());
        // Read past the gap again before the retry is due: dropped.
        assert_eq!(order.admit(7, start), Admit::Skip);
        assert_eq!(order.reread_due(start), None);
        let later = start + GAP_RETRY;
        assert_eq!(order.reread_due(later), Some(5));
        assert_eq!(order.reread_due(later), None);
        assert_eq!(order.admit(6, later + GAP_RETRY), Admit::Reread(5));
        // The missing record arrives: it and the ones after it are taken in order.
        assert_eq!(order.admit(5, later + GAP_RETRY), Admit::Take);
        assert!(!order.waiting());
        assert_eq!(order.admit(6, later + GAP_RETRY), Admit::Take);
        assert_eq!(order.admit(7, later + GAP_RETRY), Admit::Take);
    }

    #[test]
    fn a_gap_that_outlasts_the_wait_is_read_past() {
        let start = Instant::now();
        let mut order = InOrder::starting_at(Some(0));
        assert_eq!(order.admit(1, start), Admit::Reread(0));
        let expired = start + GAP_WAIT;
        // Read again once more: the record past the gap is taken then.
        assert_eq!(order.reread_due(expired), Some(0));
        assert_eq!(order.admit(1, expired), Admit::Take);
        assert!(!order.waiting());
        assert_eq!(order.admit(2, expired), Admit::Take);
        assert_eq!(order.admit(0, expired), Admit::Skip);
    }
}
