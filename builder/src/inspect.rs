//! `hyperbuild inspect`: a verified artifact's manifest and sections, for people
//! or as one JSON document.

use std::fmt::Write;
use std::path::Path;

use hvm::Artifact;

/// Opens and verifies `path`, then renders it.
pub fn inspect(path: &Path, json: bool) -> Result<String, hvm::ReadError> {
    let a = Artifact::open(path)?;
    Ok(if json {
        render_json(&a)
    } else {
        render_text(&a)
    })
}

fn sections_json(a: &Artifact) -> Vec<serde_json::Value> {
    a.header()
        .sections
        .iter()
        .map(|s| {
            serde_json::json!({
                "kind": s.kind.to_string(),
                "offset": s.offset,
                "length": s.length,
                "sha256": hex::encode(s.sha256),
                "required": s.flags & hvm::FLAG_REQUIRED != 0,
            })
        })
        .collect()
}

pub fn render_json(a: &Artifact) -> String {
    let doc = serde_json::json!({
        "digest": hvm::digest_string(&a.digest()),
        "size": a.header().file_len,
        "manifest": a.manifest(),
        "sections": sections_json(a),
    });
    serde_json::to_string_pretty(&doc).expect("json") + "\n"
}

pub fn render_text(a: &Artifact) -> String {
    let m = a.manifest();
    let mut o = String::new();
    let c = &m.config;
    let list = |v: &Option<Vec<String>>| {
        v.as_ref()
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "(none)".into())
    };
    let _ = writeln!(o, "artifact     {}", hvm::digest_string(&a.digest()));
    let _ = writeln!(o, "size         {} bytes", a.header().file_len);
    let _ = writeln!(o, "image        {}", m.image.reference);
    let _ = writeln!(o, "image digest {}", m.image.digest);
    let _ = writeln!(
        o,
        "platform     {}/{}",
        m.image.platform.os, m.image.platform.architecture
    );
    let _ = writeln!(o, "entrypoint   {}", list(&c.entrypoint));
    let _ = writeln!(o, "cmd          {}", list(&c.cmd));
    for e in &c.env {
        let _ = writeln!(o, "env          {e}");
    }
    if !c.working_dir.is_empty() {
        let _ = writeln!(o, "workdir      {}", c.working_dir);
    }
    if !c.user.is_empty() {
        let _ = writeln!(o, "user         {}", c.user);
    }
    if !c.exposed_ports.is_empty() {
        let _ = writeln!(o, "ports        {}", c.exposed_ports.join(" "));
    }
    if !c.volumes.is_empty() {
        let _ = writeln!(o, "volumes      {}", c.volumes.join(" "));
    }
    if !c.stop_signal.is_empty() {
        let _ = writeln!(o, "stop signal  {}", c.stop_signal);
    }
    let _ = writeln!(
        o,
        "kernel       {} ({})",
        m.kernel.version, m.kernel.cmdline
    );
    let _ = writeln!(
        o,
        "rootfs       {} {} bytes",
        m.rootfs.fs_type, m.rootfs.size
    );
    let _ = writeln!(o, "builder      {} {}", m.builder.name, m.builder.version);
    let _ = writeln!(o, "sections:");
    for s in &a.header().sections {
        let _ = writeln!(
            o,
            "  {:<9} offset {:>10} length {:>10} sha256:{}",
            s.kind.to_string(),
            s.offset,
            s.length,
            hex::encode(s.sha256)
        );
    }
    o
}
