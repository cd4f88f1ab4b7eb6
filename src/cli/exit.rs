//! The exit statuses of `kiln`, in one place: [`Exit`] says what each means (listed by
//! `kiln --help`, README and docs/PROTOCOL.md from the same table), and [`Failure`] is the error
//! every command returns, which carries its status.

use std::process::ExitCode;

use kiln::client::ClientError;

/// Why `kiln` stopped. The numbers are part of the command line's contract: scripts branch on
/// them; a new reason gets a new number, an old one never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    Ok = 0,
    /// A job (or a batch) ran and did not complete: failed, cancelled, partial.
    JobFailed = 1,
    /// Bad usage: clap's own errors (an unknown flag, a missing argument), and values it cannot
    /// check (a `name=value`, a `--status`, a profile).
    Usage = 2,
    /// Kiln cannot be reached: no NATS server at the URL, no node answering, a request timed out.
    Unreachable = 3,
    /// An invariant was broken (`kiln chaos` found a violation).
    Invariant = 4,
    /// Kiln answered with an error code (`not_found`, `bad_request`, `unknown_model`,
    /// `overloaded`...): the request was refused.
    Refused = 5,
    /// Anything else: a file that cannot be read or written, a download whose sha256 differs,
    /// a node or gateway that fails to start.
    Error = 6,
}

impl Exit {
    /// Every status, in numeric order, with its meaning in one line.
    pub const ALL: [(Exit, &'static str); 7] = [
        (Exit::Ok, "success"),
        (Exit::JobFailed, "a job or batch ran and did not complete (failed, cancelled, partial)"),
        (Exit::Usage, "bad usage: an unknown command or flag, a missing or malformed value"),
        (Exit::Unreachable, "Kiln not reachable: no NATS server at the URL, no node answering, a timeout"),
        (Exit::Invariant, "an invariant was broken (`kiln chaos` found a violation)"),
        (Exit::Refused, "Kiln refused the request: its error code is printed (not_found, bad_request...)"),
        (Exit::Error, "any other error (a file, a download's sha256, a node that fails to start)"),
    ];

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The `EXIT STATUS` section of `kiln --help`.
pub fn help() -> String {
    let mut text = String::from("Exit status:\n");
    for (exit, what) in Exit::ALL {
        text.push_str(&format!("  {}  {what}\n", exit.code()));
    }
    text
}

/// A command's failure: what to print and the status to exit with.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { exit, message: message.into() }
    }
    pub fn job(message: impl Into<String>) -> Failure {
        Failure::new(Exit::JobFailed, message)
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, message)
    }
    pub fn unreachable(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Unreachable, message)
    }
    pub fn invariant(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Invariant, message)
    }

    /// Prints it as `kiln: ...` on stderr and gives its status.
    pub fn report(self) -> ExitCode {
        eprintln!("kiln: {}", self.message);
        ExitCode::from(self.exit.code())
    }
}

/// What a client error means for the exit status. Pure.
pub fn exit_of(error: &ClientError) -> Exit {
    match error {
        ClientError::Api(_) => Exit::Refused,
        ClientError::NoResponders(_) | ClientError::Timeout(_) => Exit::Unreachable,
        ClientError::Nats(m) if m.contains("cannot connect") || m.contains("timed out") || m.contains("connection") => Exit::Unreachable,
        ClientError::Nats(_) | ClientError::Decode(_) | ClientError::Io(_) => Exit::Error,
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Failure {
        Failure::new(exit_of(&error), error.to_string())
    }
}

/// A plain message is the catch-all ([`Exit::Error`]); the commands name every other kind.
impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(Exit::Error, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::protocol::{ApiError, ErrorCode};

    #[test]
    fn every_status_is_listed_once_in_order_and_in_the_help() {
        for (i, (exit, what)) in Exit::ALL.iter().enumerate() {
            assert_eq!(exit.code() as usize, i, "{exit:?}");
            assert!(help().contains(&format!("  {i}  {what}")));
        }
        // clap exits 2 on bad usage by itself: the table must agree.
        assert_eq!(Exit::Usage.code(), 2);
    }

    #[test]
    fn client_errors_map_to_their_status() {
        assert_eq!(exit_of(&ClientError::Api(ApiError::new(ErrorCode::NotFound, "x"))), Exit::Refused);
        assert_eq!(exit_of(&ClientError::NoResponders("kiln.api.status".into())), Exit::Unreachable);
        assert_eq!(exit_of(&ClientError::Timeout("kiln.api.status".into())), Exit::Unreachable);
        assert_eq!(exit_of(&ClientError::Nats("cannot connect to nats://127.0.0.1:1".into())), Exit::Unreachable);
        assert_eq!(exit_of(&ClientError::Decode("bad".into())), Exit::Error);
    }
}
