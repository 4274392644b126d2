//! Pipelines: DAGs of agents with staircase streaming along edges.
pub mod policy;
