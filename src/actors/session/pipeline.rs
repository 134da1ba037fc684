//! A connection's sends in flight: answered in the order they were sent,
//! however their stores complete.
//!
//! Sends are pipelined: a connection may have up to `limits.send_window`
//! sends waiting for the writer. Each takes a slot when it arrives; its
//! answer fills the slot; answers leave from the front only, so the
//! client reads its acks in the order it sent (a refusal found at once
//! waits behind the stores before it).

use std::collections::VecDeque;

#[derive(Default)]
pub struct Pipeline {
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<String>>,
}

impl Pipeline {
    /// Takes the next slot; returns its sequence number.
    pub fn open(&mut self) -> u64 {
        self.slots.push_back(None);
        self.base + self.slots.len() as u64 - 1
    }

    /// Fills slot `seq` with its answer; returns the answers now due, in
    /// order (none while an earlier slot is open).
    pub fn fill(&mut self, seq: u64, answer: String) -> Vec<String> {
        if let Some(slot) = seq
            .checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(i as usize))
        {
            *slot = Some(answer);
        }
        let mut due = Vec::new();
        while let Some(Some(_)) = self.slots.front() {
            due.push(self.slots.pop_front().flatten().expect("front is filled"));
            self.base += 1;
        }
        due
    }

    /// Sends waiting for their answer.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_leave_in_the_order_sent() {
        let mut p = Pipeline::default();
        let (a, b, c) = (p.open(), p.open(), p.open());
        assert_eq!(p.in_flight(), 3);
        assert!(p.fill(b, "b".into()).is_empty(), "b waits for a");
        assert_eq!(p.fill(a, "a".into()), vec!["a", "b"]);
        assert_eq!(p.in_flight(), 1);
        let d = p.open();
        assert!(p.fill(d, "d".into()).is_empty(), "d waits for c");
        assert_eq!(p.fill(c, "c".into()), vec!["c", "d"]);
        assert_eq!(p.in_flight(), 0);
        assert!(
            p.fill(a, "again".into()).is_empty(),
            "a filled slot is gone"
        );
    }
}
