//! The supervision layer every VMM backend shares: one supervised VMM
//! process per VM with its runtime directory ([`process`]), an HTTP/1.1
//! client for the VMMs' Unix-socket REST APIs ([`uds_http`]), orphan
//! discovery ([`discovery`]), changes to VMM files told by the kernel
//! ([`file_changes`]), and, generic over a backend's [`Flavour`], the
//! per-VM handle ([`handle::VmmVm`]) and the backend ([`backend::VmmBackend`]).
//! Nothing here knows which VMM it talks to; a flavour says what its command
//! line, calls, config and states are.

pub mod backend;
pub mod console;
pub mod discovery;
pub mod file_changes;
pub mod flavour;
pub mod handle;
pub mod process;
pub mod supervisor;
pub mod uds_http;

pub use backend::VmmBackend;
pub use flavour::{
    Api, Call, Flavour, HardStop, Launch, Poweroff, Reboot, Sampled, Supervision, Watch, Watcher,
};
pub use handle::VmmVm;
pub use process::{
    ExitClassifier, ExitExpectation, ExitInfo, ExitReporter, ProcStats, ProcessError, RuntimeDir,
    SpawnSpec, Supervised,
};
pub use uds_http::{Response, UdsClient, UdsHttpError};
