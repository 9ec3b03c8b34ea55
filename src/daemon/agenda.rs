//! The agenda: every portal's next due time in a priority queue, so that a wake-up costs
//! the portals that are due, not all of them, and an event re-plans only the portal it
//! touches. Replaced entries stay in the heap and are skipped when they surface (each
//! portal's entry carries a generation number).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use chrono::{DateTime, Utc};

use crate::schedule::plan::Due;

/// Due times by portal.
#[derive(Default)]
pub struct Agenda {
    heap: BinaryHeap<Reverse<(DateTime<Utc>, u64, String)>>,
    current: HashMap<String, (u64, Due)>,
    next_gen: u64,
}

impl Agenda {
    /// Sets (or clears) a portal's next due time.
    pub fn set(&mut self, portal: &str, due: Option<Due>) {
        match due {
            Some(d) => {
                self.next_gen += 1;
                self.current.insert(portal.to_string(), (self.next_gen, d));
                self.heap
                    .push(Reverse((d.at, self.next_gen, portal.to_string())));
            }
            None => {
                self.current.remove(portal);
            }
        }
        // Stale entries are dropped lazily; rebuild when they dominate, so memory stays
        // proportional to the portals.
        if self.heap.len() > 2 * self.current.len() + 64 {
            self.heap = self
                .current
                .iter()
                .map(|(p, (g, d))| Reverse((d.at, *g, p.clone())))
                .collect();
        }
    }

    /// A portal's entry, if it has one.
    pub fn get(&self, portal: &str) -> Option<Due> {
        self.current.get(portal).map(|(_, d)| *d)
    }

    /// Forgets portals that are no longer configured.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.current.retain(|p, _| keep(p));
    }

    fn drop_stale(&mut self) {
        while let Some(Reverse((_, g, p))) = self.heap.peek() {
            if self.current.get(p).is_some_and(|(cg, _)| cg == g) {
                return;
            }
            self.heap.pop();
        }
    }

    /// The earliest due time.
    pub fn next_at(&mut self) -> Option<DateTime<Utc>> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Takes every portal due by `now` off the agenda, earliest first.
    pub fn take_due(&mut self, now: DateTime<Utc>) -> Vec<(String, Due)> {
        let mut out = Vec::new();
        loop {
            self.drop_stale();
            match self.heap.peek() {
                Some(Reverse((t, _, _))) if *t <= now => {}
                _ => return out,
            }
            if let Some(Reverse((_, _, p))) = self.heap.pop()
                && let Some((_, d)) = self.current.remove(&p)
            {
                out.push((p, d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::plan::Reason;
    use chrono::TimeZone;

    fn due(s: i64) -> Due {
        Due {
            at: Utc.timestamp_opt(s, 0).single().unwrap(),
            reason: Reason::Watch,
            held: None,
        }
    }

    #[test]
    fn replaced_and_cleared_entries_never_come_due() {
        let mut a = Agenda::default();
        a.set("a", Some(due(10)));
        a.set("b", Some(due(20)));
        a.set("a", Some(due(30)));
        a.set("c", Some(due(5)));
        a.set("c", None);
        assert_eq!(a.next_at(), Some(due(20).at));
        let got: Vec<String> = a.take_due(due(25).at).into_iter().map(|(p, _)| p).collect();
        assert_eq!(got, vec!["b"]);
        assert_eq!(a.get("a"), Some(due(30)));
        assert!(a.take_due(due(29).at).is_empty());
        assert_eq!(a.take_due(due(30).at).len(), 1);
        assert_eq!(a.next_at(), None);
        // Many replacements keep the heap bounded.
        for i in 0..10_000 {
            a.set("x", Some(due(i)));
        }
        assert!(a.heap.len() < 200, "{}", a.heap.len());
    }
}
