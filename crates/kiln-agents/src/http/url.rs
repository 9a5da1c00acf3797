//! A deliberately strict URL parser for `http_request`, and redirect
//! `Location` resolution.
//!
//! The same parsed value decides the allowlist match, the address check, the
//! connection target and the `Host` header, so there is no second parser
//! whose reading could differ. Refused outright: userinfo, control
//! characters, non-http schemes, hosts with anything but `[a-z0-9._-]`.

use std::fmt;

use super::address::{parse_host, Host};

/// Longest URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: Host,
    pub port: u16,
    /// Origin-form request target: starts with `/`, percent-encoded, no
    /// fragment.
    pub path_and_query: String,
}

/// Why a URL was not accepted; `Display` is a sentence for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// The URL is malformed.
    Invalid(String),
    /// The URL is well formed but not something this tool fetches.
    Unsupported(String),
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Invalid(m) | UrlError::Unsupported(m) => f.write_str(m),
        }
    }
}

fn invalid(m: impl Into<String>) -> UrlError {
    UrlError::Invalid(m.into())
}

impl HttpUrl {
    /// `host[:port]` as sent in the `Host` header (port only when not 80).
    pub fn authority(&self) -> String {
        if self.port == 80 {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn parse(input: &str) -> Result<HttpUrl, UrlError> {
        let s = input.trim();
        if s.len() > MAX_URL_LEN {
            return Err(invalid(format!(
                "the URL is too long ({} bytes; the limit is {MAX_URL_LEN})",
                s.len()
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid("the URL contains control characters"));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(invalid("the URL must be absolute, starting with http://"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => {
                return Err(UrlError::Unsupported(
                    "https is not supported yet; only http:// URLs can be fetched".to_owned(),
                ))
            }
            _ => {
                return Err(UrlError::Unsupported(
                    "only http:// URLs can be fetched".to_owned(),
                ))
            }
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err(UrlError::Unsupported(
                "URLs with a user name or password are not allowed".to_owned(),
            ));
        }
        let (host_text, port) = split_host_port(authority)?;
        let host = parse_host(host_text).map_err(UrlError::Invalid)?;
        let without_fragment = tail.split('#').next().unwrap_or_default();
        let path_and_query = if without_fragment.starts_with('/') {
            encode_target(without_fragment)
        } else {
            format!("/{}", encode_target(without_fragment))
        };
        Ok(HttpUrl {
            host,
            port,
            path_and_query,
        })
    }

    /// Resolves a redirect `Location` against this URL.
    pub fn join(&self, location: &str) -> Result<HttpUrl, UrlError> {
        let loc = location.trim();
        if loc.is_empty() {
            return Err(invalid("the redirect has an empty Location"));
        }
        if has_scheme(loc) {
            return HttpUrl::parse(loc);
        }
        if loc.starts_with("//") {
            return HttpUrl::parse(&format!("http:{loc}"));
        }
        if loc.chars().any(char::is_control) {
            return Err(invalid("the redirect Location contains control characters"));
        }
        let loc = loc.split('#').next().unwrap_or_default();
        let path_and_query = if loc.starts_with('/') {
            loc.to_owned()
        } else {
            let path = self.path_and_query.split('?').next().unwrap_or("/");
            if loc.starts_with('?') {
                format!("{path}{loc}")
            } else {
                let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
                format!("{dir}{loc}")
            }
        };
        Ok(HttpUrl {
            host: self.host.clone(),
            port: self.port,
            path_and_query: encode_target(&path_and_query),
        })
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path_and_query)
    }
}

/// `scheme:` at the start (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )).
fn has_scheme(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn split_host_port(authority: &str) -> Result<(&str, u16), UrlError> {
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(i) => {
                let (h, rest) = authority.split_at(i + 1);
                match rest {
                    "" => (h, None),
                    _ => match rest.strip_prefix(':') {
                        Some(p) => (h, Some(p)),
                        None => return Err(invalid("unexpected text after the IPv6 host")),
                    },
                }
            }
            None => return Err(invalid("the IPv6 host is missing its closing `]`")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => 80,
        Some(p) => {
            if !(1..=5).contains(&p.len()) || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid("the port must be a number from 1 to 65535"));
            }
            match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(invalid("the port must be a number from 1 to 65535")),
            }
        }
    };
    Ok((host, port))
}

/// Percent-encodes every byte that is not a URI character; existing `%XX`
/// escapes are kept as they are.
fn encode_target(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'/'
                    | b'?'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> HttpUrl {
        HttpUrl::parse(s).unwrap()
    }

    #[test]
    fn parses_http_urls() {
        let u = p("HTTP://Example.com:8080/a b?q=1#frag");
        assert_eq!(u.host, Host::Name("example.com".to_owned()));
        assert_eq!(u.port, 8080);
        assert_eq!(u.path_and_query, "/a%20b?q=1");
        assert_eq!(u.to_string(), "http://example.com:8080/a%20b?q=1");
        assert_eq!(p("http://example.com").path_and_query, "/");
        assert_eq!(p("http://example.com?x").path_and_query, "/?x");
        assert_eq!(p("http://example.com:/x").port, 80);
        let v6 = p("http://[2001:db8::1]:81/");
        assert_eq!(v6.authority(), "[2001:db8::1]:81");
        assert_eq!(p("http://example.com/é").path_and_query, "/%C3%A9");
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, want) in [
            ("https://example.com/", "https is not supported yet"),
            ("ftp://example.com/", "only http://"),
            ("file:///etc/passwd", "only http://"),
            ("example.com", "must be absolute"),
            ("http://user:pw@example.com/", "user name or password"),
            ("http://example.com@127.0.0.1/", "user name or password"),
            ("http://example.com:0/", "port"),
            ("http://example.com:65536/", "port"),
            ("http://example.com:+80/", "port"),
            ("http://example.com\r\nX: y/", "control characters"),
            ("http:///path", "no host"),
            ("http://[::1/", "closing"),
            ("http://[::1]x/", "after the IPv6"),
            ("http://exa\\mple.com/", "may only contain"),
        ] {
            let err = HttpUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn joins_locations() {
        let base = p("http://example.com/a/b?q=1");
        assert_eq!(base.join("/c").unwrap().to_string(), "http://example.com/c");
        assert_eq!(
            base.join("c").unwrap().to_string(),
            "http://example.com/a/c"
        );
        assert_eq!(
            base.join("?z=2").unwrap().to_string(),
            "http://example.com/a/b?z=2"
        );
        assert_eq!(
            base.join("//other.org/x").unwrap().to_string(),
            "http://other.org/x"
        );
        assert_eq!(
            base.join("http://127.0.0.1/").unwrap().host,
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        assert!(base.join("https://example.com/").is_err());
        assert!(base.join("javascript:alert(1)").is_err());
        assert!(base.join("").is_err());
    }
}
