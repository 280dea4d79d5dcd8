//! `console`: a VM's serial output on stdout, as the guest wrote it. Without
//! `--follow`, GetConsoleOutput until the end; with it, StreamConsole until
//! the VM is deleted (a clean end) or Ctrl-C. A stream the server ended by
//! going away (`unavailable`, e.g. a restart) is opened again from the last
//! offset printed, after a short backoff, so nothing is printed twice.

use std::io::Write as _;

use connectrpc::ErrorCode;
use vmcp::proto::vmm::v1 as pb;

use crate::cli::ConsoleArgs;
use crate::connect::Client;
use crate::error::CtlError;
use crate::watch::{BACKOFF_FIRST, BACKOFF_MAX};

/// Bytes asked for per GetConsoleOutput (the server's maximum).
const READ_BYTES: u32 = 1 << 20;

pub async fn run(client: &Client, args: &ConsoleArgs) -> Result<(), CtlError> {
    if !args.follow {
        return print_all(client, &args.vm_id, args.offset).await;
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    tokio::select! {
        biased;
        _ = &mut interrupted => Ok(()),
        result = follow(client, &args.vm_id, args.offset) => result,
    }
}

/// Reads from `offset` until nothing more comes.
async fn print_all(client: &Client, vm_id: &str, mut offset: u64) -> Result<(), CtlError> {
    loop {
        let r = client
            .get_console_output(pb::GetConsoleOutputRequest {
                vm_id: vm_id.to_owned(),
                offset,
                max_bytes: READ_BYTES,
                ..Default::default()
            })
            .await?
            .into_owned();
        if r.data.is_empty() {
            return Ok(());
        }
        write(&r.data)?;
        offset = r.next_offset;
    }
}

async fn follow(client: &Client, vm_id: &str, mut offset: u64) -> Result<(), CtlError> {
    let mut backoff = BACKOFF_FIRST;
    let mut established = false;
    loop {
        let request = pb::StreamConsoleRequest {
            vm_id: vm_id.to_owned(),
            offset,
            ..Default::default()
        };
        let ended = match client.stream_console(request).await {
            Err(e) => Some(e),
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        let m = m.to_owned_message();
                        established = true;
                        backoff = BACKOFF_FIRST;
                        write(&m.data)?;
                        offset = m.next_offset;
                    }
                    // The VM was deleted.
                    Ok(None) => return Ok(()),
                    Err(e) => break Some(e),
                }
            },
        };
        let Some(e) = ended else { return Ok(()) };
        // Until the first message, a server that cannot be reached is an error.
        if e.code != ErrorCode::Unavailable || !established {
            return Err(e.into());
        }
        let _ = writeln!(
            std::io::stderr(),
            "vmcpctl: console interrupted ({e}); following again from offset {offset} in {backoff:?}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn write(data: &[u8]) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(CtlError::Output)
}
