//! AWS shared configuration: `~/.aws/credentials` and `~/.aws/config` (or
//! `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), profile from
//! `AWS_PROFILE` else `default`. Only static keys, region and endpoint are
//! read; the environment wins over a profile.

use std::path::PathBuf;

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The `key = value` pairs of section `[name]` of an INI file.
fn section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = h.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

pub(crate) fn parse(credentials: &str, config: &str, profile: &str) -> Option<Profile> {
    let mut p = Profile::default();
    let config_name = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let mut found = false;
    for (k, v) in section(config, &config_name)
        .into_iter()
        .chain(section(credentials, profile))
    {
        found = true;
        let slot = match k.as_str() {
            "aws_access_key_id" => &mut p.access_key_id,
            "aws_secret_access_key" => &mut p.secret_access_key,
            "aws_session_token" => &mut p.session_token,
            "region" => &mut p.region,
            "endpoint_url" => &mut p.endpoint_url,
            _ => continue,
        };
        *slot = Some(v);
    }
    found.then_some(p)
}

pub(crate) fn load() -> Option<Profile> {
    let home = PathBuf::from(std::env::var_os("HOME")?);
    let file = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws").join(default))
    };
    let credentials = std::fs::read_to_string(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))
        .unwrap_or_default();
    let config = std::fs::read_to_string(file("AWS_CONFIG_FILE", "config")).unwrap_or_default();
    let name = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    parse(&credentials, &config, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_both_files() {
        let creds = "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[ci]\n# comment\naws_access_key_id=C\naws_secret_access_key = CS\naws_session_token = T\n";
        let config = "[default]\nregion = eu-west-1\n[profile ci]\nregion = us-east-2\nendpoint_url = http://127.0.0.1:9000\n";
        let ci = parse(creds, config, "ci").unwrap();
        assert_eq!(ci.access_key_id.as_deref(), Some("C"));
        assert_eq!(ci.secret_access_key.as_deref(), Some("CS"));
        assert_eq!(ci.session_token.as_deref(), Some("T"));
        assert_eq!(ci.region.as_deref(), Some("us-east-2"));
        assert_eq!(ci.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        let d = parse(creds, config, "default").unwrap();
        assert_eq!(d.access_key_id.as_deref(), Some("D"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        assert_eq!(d.endpoint_url, None);
        assert_eq!(parse(creds, config, "nope"), None);
    }
}
