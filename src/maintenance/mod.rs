//! Store maintenance an operator runs from the command line, with no HTTP in it: master-key
//! rotation (re-sealing every secret, counting what is sealed under which key) and backups.

pub mod backup;
pub mod reseal;
