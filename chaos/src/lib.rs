//! keel-chaos injects faults into a network-namespace lab of real keel nodes — SIGKILL of the
//! leader, cut links, rolling restarts — while a client probes the VIP and a monitor samples
//! every node's addresses, and asserts on failover time, split brain and lost state.
//!
//! Nothing is implemented yet: it needs the cluster and the VIP. The lab it drives will be
//! `deploy/lab.sh`.
