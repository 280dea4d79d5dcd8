//! Building blocks shared by the VMM backends (Cloud Hypervisor,
//! Firecracker): supervision of one VMM process per VM with its runtime
//! directory, and an HTTP/1.1 client for the VMMs' Unix-socket REST APIs.
//! Nothing here knows which VMM it talks to; backends decide what an exit,
//! a status code or an error body means.

pub mod discovery;
pub mod process;
pub mod uds_http;

pub use process::{
    ExitClassifier, ExitExpectation, ExitInfo, ExitReporter, ProcStats, ProcessError, RuntimeDir,
    SpawnSpec, Supervised,
};
pub use uds_http::{Response, UdsClient, UdsHttpError};
