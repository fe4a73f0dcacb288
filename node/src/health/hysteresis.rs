//! HAProxy's rise/fall hysteresis: turning a stream of check results into up/down verdicts.
//!
//! One flaky check must not bounce a server in and out of rotation, so a verdict changes only
//! after `fall` consecutive failures (up → down) or `rise` consecutive successes (down → up).
//! The one exception is start-up: a server starts up but *unconfirmed*, and like HAProxy a
//! failure before its first success takes it down at once — a backend that is dead at boot
//! should leave rotation after one interval, not after `fall` intervals of errors to clients.
//!
//! Pure logic with no clock and no I/O, so every sequence is testable; the caller owns timing.

/// The verdict of one server's active checks, fed one result at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    up: bool,
    /// False until the first success: until then one failure is enough to go down.
    confirmed: bool,
    successes: u32,
    failures: u32,
}

impl Hysteresis {
    /// A server at start-up: up but unconfirmed. `rise` and `fall` below 1 are taken as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self { rise: rise.max(1), fall: fall.max(1), up: true, confirmed: false, successes: 0, failures: 0 }
    }

    /// A server already known down (e.g. carried over a config reload): it needs `rise`
    /// consecutive successes to come up.
    pub fn down(rise: u32, fall: u32) -> Self {
        Self { up: false, confirmed: true, ..Self::new(rise, fall) }
    }

    /// Whether the server is currently considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive successes up to and including the latest result (0 if it failed).
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Consecutive failures up to and including the latest result (0 if it succeeded).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one check result. Returns the new state only when this result flips it, so the
    /// caller acts (and logs) exactly once per transition.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            self.confirmed = true;
            if !self.up && self.successes >= self.rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.up && (!self.confirmed || self.failures >= self.fall) {
                self.up = false;
                self.confirmed = true;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `results` ('+' success, '-' failure) and returns the flips as (index, new state).
    fn run(h: &mut Hysteresis, results: &str) -> Vec<(usize, bool)> {
        results.chars().enumerate().filter_map(|(i, c)| h.observe(c == '+').map(|up| (i, up))).collect()
    }

    #[test]
    fn first_failure_at_start_takes_the_server_down_at_once() {
        let mut h = Hysteresis::new(2, 3);
        assert!(h.is_up());
        assert_eq!(h.observe(false), Some(false));
        assert!(!h.is_up());
    }

    #[test]
    fn after_a_first_success_fall_consecutive_failures_are_needed() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(run(&mut h, "+--"), []);
        assert!(h.is_up());
        assert_eq!(run(&mut h, "-"), [(0, false)]);
        assert_eq!(h.consecutive_failures(), 3);
    }

    #[test]
    fn a_success_interrupts_a_run_of_failures() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(run(&mut h, "+--+--+--+"), []);
        assert!(h.is_up());
        assert_eq!(run(&mut h, "---"), [(2, false)]);
    }

    #[test]
    fn rise_consecutive_successes_bring_a_down_server_up() {
        let mut h = Hysteresis::new(3, 2);
        assert_eq!(run(&mut h, "-"), [(0, false)]);
        assert_eq!(run(&mut h, "++-++"), []);
        assert!(!h.is_up());
        assert_eq!(run(&mut h, "+"), [(0, true)]);
        assert_eq!(h.consecutive_successes(), 3);
    }

    #[test]
    fn each_flip_is_reported_once() {
        let mut h = Hysteresis::new(2, 2);
        assert_eq!(run(&mut h, "+------++++++--"), [(2, false), (8, true), (14, false)]);
    }

    #[test]
    fn after_recovering_the_start_up_rule_no_longer_applies() {
        let mut h = Hysteresis::new(1, 3);
        assert_eq!(run(&mut h, "-+--"), [(0, false), (1, true)]);
        assert!(h.is_up());
    }

    #[test]
    fn a_server_resumed_down_needs_rise_successes() {
        let mut h = Hysteresis::down(2, 3);
        assert!(!h.is_up());
        assert_eq!(run(&mut h, "-+-+"), []);
        assert_eq!(run(&mut h, "+"), [(0, true)]);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut h = Hysteresis::new(1, 1);
        assert_eq!(run(&mut h, "++-+-"), [(2, false), (3, true), (4, false)]);
        let mut zero = Hysteresis::new(0, 0);
        assert_eq!(run(&mut zero, "+-+"), [(1, false), (2, true)]);
    }
}
