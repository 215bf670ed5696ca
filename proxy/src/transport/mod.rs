//! Sockets: the transparent listener SYNs are assigned to, the original
//! destination of an accepted connection, and backend connections to pods.
pub mod backend;
pub mod inq;
pub mod listener;
pub mod liveness;
pub mod local;
pub mod orig_dst;
