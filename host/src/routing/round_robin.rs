//! Round robin: each request to the next available replica, for comparison.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Policy, ReplicaView, RouteRequest};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn select(&self, _request: &RouteRequest<'_>, replicas: &[ReplicaView]) -> Option<usize> {
        let n = replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&index| replicas[index].available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_go_around_and_skip_unavailable_replicas() {
        let policy = RoundRobin::default();
        let request = RouteRequest {
            text: "",
            hint: None,
        };
        let mut replicas = super::super::views(&[0, 0, 0]);
        let picks: Vec<_> = (0..4)
            .filter_map(|_| policy.select(&request, &replicas))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
        replicas[2].available = false;
        let picks: Vec<_> = (0..3)
            .filter_map(|_| policy.select(&request, &replicas))
            .collect();
        assert_eq!(picks, vec![1, 0, 0]);
        replicas.iter_mut().for_each(|r| r.available = false);
        assert_eq!(policy.select(&request, &replicas), None);
    }
}
