//! A detached VM's logs: the app's stdout and stderr kept apart, one record
//! per line with the time it was read (`NANOS F|P BYTES\n`: `F` a whole
//! line, `P` a piece the app wrote without a newline), each file capped and
//! rotated once (`stdout.log.1`), as Docker's `local` driver does. Reading
//! merges both streams by time, can keep the last N lines, and can follow
//! the files until the VM has exited.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes a log file may reach before it is rotated.
pub fn cap() -> u64 {
    std::env::var("HYPER_LOG_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8 << 20)
}

/// A piece of the app's output longer than this is written without waiting
/// for its newline.
const PIECE_MAX: usize = 64 * 1024;

/// Nanoseconds since the epoch.
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Writes one stream's log.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    pending: Vec<u8>,
}

impl LogWriter {
    pub fn create(path: &Path) -> std::io::Result<LogWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            size,
            pending: Vec::new(),
        })
    }

    fn record(&mut self, whole: bool, data: &[u8]) -> std::io::Result<()> {
        if self.size >= cap() {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, old)?;
            self.file = File::create(&self.path)?;
            self.size = 0;
        }
        let mut rec = format!("{} {} ", now_ns(), if whole { 'F' } else { 'P' }).into_bytes();
        rec.extend_from_slice(data);
        rec.push(b'\n');
        self.file.write_all(&rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    /// Takes what the app wrote.
    pub fn take(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&data[..nl]);
            self.record(true, &line)?;
            data = &data[nl + 1..];
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() >= PIECE_MAX {
            let piece = std::mem::take(&mut self.pending);
            self.record(false, &piece)?;
        }
        Ok(())
    }

    /// Writes what is left without a newline.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let piece = std::mem::take(&mut self.pending);
            self.record(false, &piece)?;
        }
        Ok(())
    }
}

/// Copies everything readable from `from` into a log until it ends
/// (a thread `log NAME`).
pub fn collect(
    name: &str,
    mut from: File,
    mut to: LogWriter,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("log {name}"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.take(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.finish();
        })
}

/// One record of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ns: u128,
    pub whole: bool,
    pub data: Vec<u8>,
    /// 1: stdout, 2: stderr.
    pub stream: u8,
}

/// Parses one stored line (without its `\n`); None for a damaged one.
pub fn parse(line: &[u8], stream: u8) -> Option<Record> {
    let sp = line.iter().position(|&b| b == b' ')?;
    let ns = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
    let kind = line.get(sp + 1)?;
    if line.get(sp + 2) != Some(&b' ') {
        return None;
    }
    Some(Record {
        ns,
        whole: *kind == b'F',
        data: line[sp + 3..].to_vec(),
        stream,
    })
}

/// Reads the records of a file from `offset`; returns them and the offset
/// after the last complete line.
pub fn read_from(path: &Path, offset: u64, stream: u8) -> (Vec<Record>, u64) {
    let Ok(mut f) = File::open(path) else {
        return (Vec::new(), offset);
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return (Vec::new(), offset);
    }
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    let mut at = offset;
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(n) if line.last() == Some(&b'\n') => {
                at += n as u64;
                if let Some(rec) = parse(&line[..n - 1], stream) {
                    out.push(rec);
                }
            }
            Ok(_) => break, // a line still being written
        }
    }
    (out, at)
}

/// Every record of both streams, by time (stdout first on a tie).
pub fn read_all(dir: &Path) -> Vec<Record> {
    let mut all = Vec::new();
    for (stream, name) in [(1u8, "stdout.log"), (2, "stderr.log")] {
        all.extend(read_from(&dir.join(format!("{name}.1")), 0, stream).0);
        all.extend(read_from(&dir.join(name), 0, stream).0);
    }
    all.sort_by_key(|r| (r.ns, r.stream));
    all
}

/// `2026-11-30T07:10:00.123456789Z` for nanoseconds since the epoch.
pub fn rfc3339(ns: u128) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Writes records to stdout and stderr as the app wrote them.
pub fn print(records: &[Record], timestamps: bool) -> std::io::Result<()> {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    for r in records {
        let w: &mut dyn Write = if r.stream == 1 { &mut out } else { &mut err };
        if timestamps {
            write!(w, "{} ", rfc3339(r.ns))?;
        }
        w.write_all(&r.data)?;
        if r.whole {
            w.write_all(b"\n")?;
        }
    }
    out.flush()?;
    err.flush()
}

/// Follows both files from their current ends until `done()` says the VM
/// has exited and nothing more came.
pub fn follow(dir: &Path, timestamps: bool, done: impl Fn() -> bool) -> std::io::Result<()> {
    let names = ["stdout.log", "stderr.log"];
    let len = |n: &str| std::fs::metadata(dir.join(n)).map_or(0, |m| m.len());
    let mut at = [len(names[0]), len(names[1])];
    loop {
        let finished = done();
        let mut fresh = Vec::new();
        for (i, name) in names.iter().enumerate() {
            // Rotated since: the rest of the old file, then the new one.
            if len(name) < at[i] {
                let old = dir.join(format!("{name}.1"));
                fresh.extend(read_from(&old, at[i], i as u8 + 1).0);
                at[i] = 0;
            }
            let (recs, end) = read_from(&dir.join(name), at[i], i as u8 + 1);
            at[i] = end;
            fresh.extend(recs);
        }
        fresh.sort_by_key(|r| (r.ns, r.stream));
        print(&fresh, timestamps)?;
        if finished && fresh.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_pieces_and_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stdout.log");
        let mut w = LogWriter::create(&p).unwrap();
        w.take(b"one\ntw").unwrap();
        w.take(b"o\nthree").unwrap();
        w.finish().unwrap();
        let (recs, end) = read_from(&p, 0, 1);
        let text: Vec<(&[u8], bool)> = recs.iter().map(|r| (&r.data[..], r.whole)).collect();
        assert_eq!(
            text,
            [
                (&b"one"[..], true),
                (&b"two"[..], true),
                (&b"three"[..], false)
            ]
        );
        assert_eq!(end, std::fs::metadata(&p).unwrap().len());
        assert!(recs.windows(2).all(|w| w[0].ns <= w[1].ns));
        // Binary bytes survive; a damaged line is skipped.
        std::fs::write(&p, b"12 F \xff\x00x\nnot a record\n13 P y\n").unwrap();
        let (recs, _) = read_from(&p, 0, 2);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].data, b"\xff\x00x");
        assert_eq!(parse(b"5 Q", 1), None);
    }

    #[test]
    fn times_read_as_docker_prints_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_796_022_000_123_456_789),
            "2026-11-30T07:00:00.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}
