//! Handing a running agent's state over to its successor (restart and
//! upgrade without losing a connection). Built bottom-up: so far only the
//! descriptor channel ([`scm`]) exists; nothing calls it yet.
pub mod scm;
