//! `watch`: WatchVms until interrupted, one line (or one JSON document) per
//! message. Every message carries a revision; when the stream ends because
//! the server went away (`unavailable`, e.g. a restart) or dropped this
//! watcher for falling behind (`resource_exhausted` naming `since_revision`),
//! vmcpctl watches again from the highest revision it has printed, after a
//! short backoff, so nothing is missed or printed twice. A revision the
//! server no longer keeps (`out_of_range`) ends the watch: list again.

use std::io::Write as _;
use std::time::Duration;

use connectrpc::{ConnectError, ErrorCode};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::WatchEventType as T;

use crate::cli::{Output, WatchArgs};
use crate::connect::Client;
use crate::error::CtlError;
use crate::output::{one_line, state_name};

/// The first wait before watching again; it doubles up to [`BACKOFF_MAX`] while
/// reconnecting fails, and starts over once a message arrives.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait before watching again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The request the flags ask for.
pub fn request(args: &WatchArgs) -> pb::WatchVmsRequest {
    pb::WatchVmsRequest {
        vm_ids: args.vm_ids.clone(),
        state_filter: args
            .states
            .iter()
            .map(|s| crate::list_state(*s).into())
            .collect(),
        since_revision: args.since.unwrap_or(0),
        send_initial: args.initial,
        ..Default::default()
    }
}

/// Where a watch stands: what to ask for when it connects again.
#[derive(Debug)]
pub struct Resume {
    first: pb::WatchVmsRequest,
    /// The highest revision received that a resume can start from.
    highest: Option<u64>,
    /// A SYNCED has been received (the initial ADDED messages of `--initial`
    /// carry each VM's own revision, not a point in the stream, until then).
    synced: bool,
}

impl Resume {
    pub fn new(first: pb::WatchVmsRequest) -> Self {
        Self {
            first,
            highest: None,
            synced: false,
        }
    }

    /// The request for the next connection: the first one, or from the highest
    /// revision seen. An `--initial` watch cut off before its SYNCED lists again.
    pub fn request(&self) -> pb::WatchVmsRequest {
        let mut request = self.first.clone();
        if let Some(revision) = self.highest {
            request.since_revision = revision;
            request.send_initial = false;
        }
        request
    }

    /// Takes note of one message received.
    pub fn saw(&mut self, m: &pb::WatchVmsResponse) {
        let kind = m.r#type.as_known();
        if kind == Some(T::WATCH_EVENT_TYPE_SYNCED) {
            self.synced = true;
        }
        if self.first.send_initial && !self.synced {
            return;
        }
        self.highest = Some(self.highest.map_or(m.revision, |h| h.max(m.revision)));
    }
}

/// What to do when a stream ended with `e`.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Watch again from the highest revision seen.
    Resume,
    /// The revision is no longer kept: list again.
    ListAgain,
    /// Give up with the error.
    Fail,
}

pub fn after(e: &ConnectError) -> After {
    match e.code {
        ErrorCode::Unavailable => After::Resume,
        // A watcher that fell behind; the watcher cap says nothing of a revision.
        ErrorCode::ResourceExhausted
            if e.message
                .as_deref()
                .unwrap_or_default()
                .contains("since_revision=") =>
        {
            After::Resume
        }
        ErrorCode::OutOfRange => After::ListAgain,
        _ => After::Fail,
    }
}

/// Watches until interrupted (Ctrl-C: success) or an error that a new watch cannot cure.
pub async fn run(client: &Client, output: Output, args: &WatchArgs) -> Result<(), CtlError> {
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut resume = Resume::new(request(args));
    let mut lines = Lines {
        output,
        header: false,
    };
    tokio::select! {
        biased;
        _ = &mut interrupted => Ok(()),
        result = follow(client, &mut resume, &mut lines) => result,
    }
}

async fn follow(client: &Client, resume: &mut Resume, lines: &mut Lines) -> Result<(), CtlError> {
    let mut backoff = BACKOFF_FIRST;
    let mut established = false;
    loop {
        let (received, end) = once(client, resume, lines).await?;
        if received {
            established = true;
            backoff = BACKOFF_FIRST;
        }
        let why = match end {
            // A clean end is not expected of a watch; watch again.
            None => "the server ended the watch".to_owned(),
            Some(e) => match after(&e) {
                After::ListAgain => return Err(CtlError::ListAgain(e)),
                // Until the first message, a server that cannot be reached is an error
                // (a wrong --address), not something to wait out.
                After::Resume if established => e.to_string(),
                After::Resume | After::Fail => return Err(e.into()),
            },
        };
        let from = match resume.request() {
            r if r.send_initial => "with the initial list again".to_owned(),
            r => format!("from revision {}", r.since_revision),
        };
        // stderr, so that stdout stays one document per line; nothing to do if it is gone.
        let _ = writeln!(
            std::io::stderr(),
            "vmcpctl: watch interrupted ({why}); watching again {from} in {backoff:?}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One WatchVms call, printed as it comes: whether anything arrived, and the
/// error that ended it (`None` for a clean end).
async fn once(
    client: &Client,
    resume: &mut Resume,
    lines: &mut Lines,
) -> Result<(bool, Option<ConnectError>), CtlError> {
    let mut stream = match client.watch_vms(resume.request()).await {
        Ok(stream) => stream,
        Err(e) => return Ok((false, Some(e))),
    };
    let mut received = false;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let m = m.to_owned_message();
                received = true;
                resume.saw(&m);
                lines.print(&m)?;
            }
            Ok(None) => return Ok((received, None)),
            Err(e) => return Ok((received, Some(e))),
        }
    }
}

/// Prints messages as they arrive.
struct Lines {
    output: Output,
    header: bool,
}

impl Lines {
    fn print(&mut self, m: &pb::WatchVmsResponse) -> Result<(), CtlError> {
        let mut out = std::io::stdout().lock();
        let written = match self.output {
            Output::Json => serde_json::to_writer(&mut out, m)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out)),
            Output::Table => match event_line(m) {
                None => Ok(()),
                Some(line) if !self.header => {
                    self.header = true;
                    writeln!(out, "{}\n{line}", header_line())
                }
                Some(line) => writeln!(out, "{line}"),
            },
        };
        written.and_then(|()| out.flush()).map_err(CtlError::Output)
    }
}

fn columns(kind: &str, id: &str, state: &str, revision: &str, reason: &str) -> String {
    format!("{kind:<7}  {id:<20}  {state:<10}  {revision:<8}  {reason}")
        .trim_end()
        .to_owned()
}

fn header_line() -> String {
    columns("TYPE", "ID", "STATE", "REVISION", "REASON")
}

/// The line of a message for people; none for heartbeats.
fn event_line(m: &pb::WatchVmsResponse) -> Option<String> {
    let kind = match m.r#type.as_known() {
        Some(T::WATCH_EVENT_TYPE_HEARTBEAT) => return None,
        Some(T::WATCH_EVENT_TYPE_ADDED) => "ADDED".to_owned(),
        Some(T::WATCH_EVENT_TYPE_CHANGED) => "CHANGED".to_owned(),
        Some(T::WATCH_EVENT_TYPE_DELETED) => "DELETED".to_owned(),
        Some(T::WATCH_EVENT_TYPE_SYNCED) => "SYNCED".to_owned(),
        Some(T::WATCH_EVENT_TYPE_UNSPECIFIED) | None => format!("UNKNOWN({})", m.r#type.to_i32()),
    };
    let revision = m.revision.to_string();
    Some(match m.vm.as_option() {
        Some(vm) => {
            let state = match vm.state.as_known() {
                Some(s) => state_name(s).to_owned(),
                None => format!("UNKNOWN({})", vm.state.to_i32()),
            };
            columns(
                &kind,
                &vm.vm_id,
                &state,
                &revision,
                &one_line(&vm.state_reason),
            )
        }
        None => columns(&kind, "-", "-", &revision, ""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: T, id: Option<&str>, revision: u64) -> pb::WatchVmsResponse {
        pb::WatchVmsResponse {
            r#type: kind.into(),
            vm: id
                .map(|id| pb::VmInfo {
                    vm_id: id.into(),
                    state: pb::VmState::VM_STATE_RUNNING.into(),
                    state_reason: "booted".into(),
                    revision,
                    ..Default::default()
                })
                .into(),
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_multi_line_reason_stays_on_its_event_line() {
        let mut m = msg(T::WATCH_EVENT_TYPE_CHANGED, Some("web"), 4);
        if let Some(vm) = m.vm.as_option_mut() {
            vm.state_reason = "VMM killed by signal 9; last log lines:\nwarn: a\n  warn: b".into();
        }
        let line = event_line(&m).expect("a line");
        assert!(!line.contains('\n'), "{line:?}");
        assert!(
            line.ends_with("VMM killed by signal 9; last log lines: warn: a warn: b"),
            "{line:?}"
        );
    }

    #[test]
    fn a_live_watch_resumes_from_the_highest_revision_seen() {
        let mut r = Resume::new(pb::WatchVmsRequest {
            vm_ids: vec!["a".into()],
            ..Default::default()
        });
        assert_eq!(r.request().since_revision, 0);
        r.saw(&msg(T::WATCH_EVENT_TYPE_SYNCED, None, 7));
        assert_eq!(r.request().since_revision, 7);
        r.saw(&msg(T::WATCH_EVENT_TYPE_CHANGED, Some("a"), 9));
        r.saw(&msg(T::WATCH_EVENT_TYPE_HEARTBEAT, None, 9));
        let next = r.request();
        assert_eq!(next.since_revision, 9);
        assert_eq!(next.vm_ids, ["a"], "the filters stay");
    }

    #[test]
    fn an_initial_watch_lists_again_until_its_synced() {
        let mut r = Resume::new(pb::WatchVmsRequest {
            send_initial: true,
            ..Default::default()
        });
        // Initial ADDED messages carry each VM's own revision: no resume point.
        r.saw(&msg(T::WATCH_EVENT_TYPE_ADDED, Some("b"), 12));
        assert!(r.request().send_initial);
        assert_eq!(r.request().since_revision, 0);
        r.saw(&msg(T::WATCH_EVENT_TYPE_SYNCED, None, 15));
        let next = r.request();
        assert!(
            !next.send_initial,
            "since_revision and send_initial are exclusive"
        );
        assert_eq!(next.since_revision, 15);
    }

    #[test]
    fn which_errors_resume() {
        assert_eq!(
            after(&ConnectError::unavailable("shutting down")),
            After::Resume
        );
        assert_eq!(
            after(&ConnectError::resource_exhausted(
                "watcher fell behind; resume with since_revision=42"
            )),
            After::Resume
        );
        assert_eq!(
            after(&ConnectError::resource_exhausted("too many watchers")),
            After::Fail
        );
        assert_eq!(
            after(&ConnectError::out_of_range("list again")),
            After::ListAgain
        );
        assert_eq!(after(&ConnectError::not_found("x")), After::Fail);
    }

    #[test]
    fn lines_are_aligned_and_heartbeats_hidden() {
        assert_eq!(
            header_line(),
            "TYPE     ID                    STATE       REVISION  REASON"
        );
        assert_eq!(
            event_line(&msg(T::WATCH_EVENT_TYPE_CHANGED, Some("web-1"), 12)).as_deref(),
            Some("CHANGED  web-1                 RUNNING     12        booted")
        );
        assert_eq!(
            event_line(&msg(T::WATCH_EVENT_TYPE_SYNCED, None, 12)).as_deref(),
            Some("SYNCED   -                     -           12")
        );
        assert_eq!(
            event_line(&msg(T::WATCH_EVENT_TYPE_HEARTBEAT, None, 12)),
            None
        );
    }
}
