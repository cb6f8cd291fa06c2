//! hyperboot's own terminal: its size, and raw mode for `-t`.

use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

/// The size (rows, columns) of the terminal on stdin or stdout, if any.
pub fn size() -> Option<[u16; 2]> {
    let rows_cols = |w: rustix::io::Result<rustix::termios::Winsize>| {
        w.ok()
            .filter(|w| w.ws_row > 0)
            .map(|w| [w.ws_row, w.ws_col])
    };
    rows_cols(tcgetwinsize(std::io::stdin())).or_else(|| rows_cols(tcgetwinsize(std::io::stdout())))
}

/// `-t` on a terminal: raw mode while the VM runs (keys, Ctrl-C included, go
/// to the app), the previous mode restored when dropped.
#[derive(Debug)]
pub struct RawMode(Option<Termios>);

impl RawMode {
    /// Raw mode on stdin when `on` and stdin is a terminal; else nothing.
    pub fn new(on: bool) -> RawMode {
        let stdin = std::io::stdin();
        if !on || !rustix::termios::isatty(&stdin) {
            return RawMode(None);
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if tcsetattr(&stdin, OptionalActions::Now, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, t);
        }
    }
}
