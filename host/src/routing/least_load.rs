//! Least load: the replica with the fewest requests in flight, for comparison.

use super::{Policy, ReplicaView, RouteRequest, least_loaded};

#[derive(Debug, Default)]
pub struct LeastLoad;

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }

    fn select(&self, _request: &RouteRequest<'_>, replicas: &[ReplicaView]) -> Option<usize> {
        least_loaded(replicas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_fewest_in_flight_among_available() {
        let request = RouteRequest {
            text: "",
            hint: None,
        };
        let mut replicas = super::super::views(&[3, 1, 2]);
        assert_eq!(LeastLoad.select(&request, &replicas), Some(1));
        replicas[1].available = false;
        assert_eq!(LeastLoad.select(&request, &replicas), Some(2));
    }
}
