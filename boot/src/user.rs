//! Resolving the image's `User` (`name`, `uid`, `name:group`, `uid:gid`) with
//! the image's own /etc/passwd and /etc/group, as Docker does.

/// Who the app runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including the primary gid).
    pub groups: Vec<u32>,
    pub home: String,
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = Passwd<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` against the given file contents (empty when absent).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = passwd_entries(passwd)
        .find(|p| p.name == user || (user.parse::<u32>().ok() == Some(p.uid)));
    let (uid, mut gid, home, name) = match (entry, user.parse::<u32>()) {
        (Some(p), _) => (p.uid, p.gid, p.home.to_string(), Some(p.name.to_string())),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        (None, Err(_)) => {
            return Err(format!(
                "unable to find user {user}: no matching entries in passwd file"
            ))
        }
    };
    if let Some(g) = grp {
        gid = match group_entries(group)
            .find(|(n, id, _)| *n == g || g.parse::<u32>().ok() == Some(*id))
        {
            Some((_, id, _)) => id,
            None => g.parse().map_err(|_| {
                format!("unable to find group {g}: no matching entries in group file")
            })?,
        };
    }
    let mut groups = vec![gid];
    if grp.is_none() {
        if let Some(name) = &name {
            for (_, id, members) in group_entries(group) {
                if members.contains(&name.as_str()) && !groups.contains(&id) {
                    groups.push(id);
                }
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\n";

    #[test]
    fn table() {
        let id = |uid, gid, groups: &[u32], home: &str| Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        };
        let cases = [
            ("", id(0, 0, &[0], "/root")),
            ("root", id(0, 0, &[0], "/root")),
            ("app", id(1000, 1000, &[1000, 50], "/home/app")),
            ("1000", id(1000, 1000, &[1000, 50], "/home/app")),
            ("app:staff", id(1000, 50, &[50], "/home/app")),
            ("1234", id(1234, 0, &[0], "/")),
            ("1234:4321", id(1234, 4321, &[4321], "/")),
            ("app:0", id(1000, 0, &[0], "/home/app")),
        ];
        for (spec, want) in cases {
            assert_eq!(resolve(spec, PASSWD, GROUP).unwrap(), want, "spec {spec:?}");
        }
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve("ghost", PASSWD, GROUP)
            .unwrap_err()
            .contains("unable to find user ghost"));
        assert!(resolve("app:ghosts", PASSWD, GROUP)
            .unwrap_err()
            .contains("unable to find group ghosts"));
        assert!(resolve("nobody", "", "").is_err());
    }
}
