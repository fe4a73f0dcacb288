//! PLACEHOLDER: to be replaced by the real algorithm.
use super::{Member, Pick, Selector};
/// Placeholder.
pub struct P2cSelector(Vec<Member>);
impl P2cSelector {
    /// Placeholder.
    pub fn new(members: &[Member]) -> Self {
        Self(members.to_vec())
    }
}
impl Selector for P2cSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        self.0.iter().map(|m| m.index).find(|&i| (pick.accept)(i))
    }
}
