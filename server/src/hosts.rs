//! Host names: how a request's `Host` is read, which names a deployment
//! may claim, and by whom.
//!
//! A claimed name routes every request for it to one deployment, so
//! claims are guarded: names are normalised the same way in the claim and
//! in the lookup (lower case, no port, no trailing dot); IP literals,
//! `localhost` (and `*.localhost`) and the names the server itself answers
//! on can never be claimed, so the path routes `/TENANT/NAME/` on the
//! server's own names are never shadowed; and a tenant may claim only
//! names inside the domains the admin gave it (the admin may claim any).

use http::{Request, header};
use std::net::IpAddr;

/// `raw` (a `Host` value or a claim) normalised: lower case, without a
/// port and without a trailing dot. `None` when it is not a usable name.
pub fn normalize(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [IPv6]:port
        &raw[..rest.find(']')? + 2]
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The host a request is for, normalised: the URI's authority (absolute
/// form) or else its one `Host` header. `Err` for several `Host` headers
/// (whatever the URI says).
pub fn of_request<B>(request: &Request<B>) -> Result<Option<String>, String> {
    let mut values = request.headers().get_all(header::HOST).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err("the request has more than one Host header".into());
    }
    if let Some(host) = request.uri().host() {
        return Ok(normalize(host));
    }
    Ok(first.and_then(|v| v.to_str().ok()).and_then(normalize))
}

/// Whether `host` (normalised) may be claimed by a deployment: not an IP
/// literal, not a loopback name, not one of `server_names`; for a tenant
/// that is not the admin, inside one of its `domains`.
pub fn check_claim(host: &str, server_names: &[String], admin: bool, domains: &[String]) -> Result<(), String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("host {host:?} is an IP address; only DNS names can be claimed"));
    }
    if host == "localhost" || host.ends_with(".localhost") {
        return Err(format!("host {host:?} is a loopback name and cannot be claimed"));
    }
    if server_names.iter().any(|name| name == host) {
        return Err(format!("host {host:?} is a name this server answers on; its paths route to /TENANT/NAME/"));
    }
    let inside = |domain: &String| host == domain || host.strip_suffix(domain.as_str()).is_some_and(|p| p.ends_with('.'));
    if !admin && !domains.iter().any(inside) {
        return Err(if domains.is_empty() {
            format!("host {host:?}: this tenant may not claim host names (the admin grants domains with `gpuwasm tenant domains`)")
        } else {
            format!("host {host:?} is outside this tenant's domains ({})", domains.join(", "))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_alike_in_claims_and_lookups() {
        for (raw, want) in [
            ("API.Example.com", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("api.example.com.:8080", "api.example.com"),
            ("Api.Example.COM:443", "api.example.com"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(want), "{raw}");
        }
        assert_eq!(normalize(""), None);
        assert_eq!(normalize("."), None);
    }

    #[test]
    fn duplicate_host_headers_are_refused() {
        let one = Request::get("/x").header("host", "a.example").body(()).unwrap();
        assert_eq!(of_request(&one).unwrap().as_deref(), Some("a.example"));
        let two = Request::get("/x").header("host", "a.example").header("host", "b.example").body(()).unwrap();
        assert!(of_request(&two).is_err());
        let absolute = Request::get("http://Abs.Example:81/x").header("host", "other").body(()).unwrap();
        assert_eq!(of_request(&absolute).unwrap().as_deref(), Some("abs.example"));
    }

    #[test]
    fn claims() {
        let names = vec!["gpuwasm.example.net".to_string()];
        let acme = vec!["example.com".to_string()];
        for forbidden in ["127.0.0.1", "10.0.0.1", "[::1]", "localhost", "app.localhost", "gpuwasm.example.net", "1234"] {
            assert!(check_claim(forbidden, &names, true, &[]).is_err(), "{forbidden}");
        }
        assert!(check_claim("api.example.com", &names, false, &acme).is_ok());
        assert!(check_claim("example.com", &names, false, &acme).is_ok());
        assert!(check_claim("evilexample.com", &names, false, &acme).unwrap_err().contains("outside this tenant's domains"));
        assert!(check_claim("api.other.org", &names, false, &acme).is_err());
        assert!(check_claim("api.other.org", &names, false, &[]).unwrap_err().contains("may not claim host names"));
        assert!(check_claim("api.other.org", &names, true, &[]).is_ok(), "the admin may claim any DNS name");
    }
}
