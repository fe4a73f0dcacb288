//! PLACEHOLDER: to be replaced by the real algorithm.
use super::{Member, Pick, Selector};
/// Placeholder.
pub struct IpHashSelector(Vec<Member>);
impl IpHashSelector {
    /// Placeholder.
    pub fn new(members: &[Member]) -> Self {
        Self(members.to_vec())
    }
}
impl Selector for IpHashSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        self.0.iter().map(|m| m.index).find(|&i| (pick.accept)(i))
    }
}
