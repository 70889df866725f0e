//! One exit-status policy for every command, the daemon and the tools alike.

use std::process::ExitCode;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done, or nothing found wrong.
    Done,
    /// 1: a runtime failure, or problems found (`check`, `verify`, `restore`).
    Failed,
    /// 2: a configuration or usage error, before anything was done.
    Usage,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(match exit {
            Exit::Done => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
        })
    }
}
