//! The local lab: network namespaces standing in for a node and two pods, and an emulation of
//! the network policy agent's datapath on the node, so the race can be reproduced and caught
//! on one machine. Everything it creates carries the lab's id and is removed by `Lab::drop`.

pub mod agent;
pub mod datapath;
pub mod reproducer;
pub mod session;
pub mod topology;
