//! The authorization URL a customer opens, and its PKCE pair.

use oauth2::PkceCodeChallenge;
use url::form_urlencoded;

use crate::secret::Secret;

/// `{base_url}/identity/connect/authorize?response_type=code&client_id=...` with
/// the scopes, state and an S256 PKCE challenge. Every value is form-encoded, so a
/// client ID with `@Tenant Name` survives whole.
pub fn authorize_url(
    base_url: &str,
    client_id: &str,
    redirect_uri: &str,
    scopes: &[String],
    state: &str,
    pkce_challenge: &str,
) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", &scopes.join(" "))
        .append_pair("state", state)
        .append_pair("code_challenge", pkce_challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    format!(
        "{}/identity/connect/authorize?{query}",
        base_url.trim_end_matches('/')
    )
}

/// A fresh PKCE pair: the verifier (32 random bytes, base64url; kept sealed until
/// the code exchange) and its S256 challenge (sent in the authorization URL).
pub fn pkce_pair() -> (Secret, String) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    (
        Secret::new(verifier.secret().clone()),
        challenge.as_str().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use sha2::{Digest, Sha256};

    #[test]
    fn url_carries_every_parameter_encoded() {
        let u = authorize_url(
            "https://erp.example.com/AcumaticaERP/",
            "88358B02-A48D-A50E-F710-39C1636C30F6@My Company",
            "https://connect.example.com/settings/acumaticacallback",
            &["api".into(), "offline_access".into()],
            "st&ate",
            "CHALLENGE",
        );
        let parsed = url::Url::parse(&u).unwrap();
        assert_eq!(parsed.path(), "/AcumaticaERP/identity/connect/authorize");
        let q: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("response_type"), Some("code"));
        assert_eq!(
            get("client_id"),
            Some("88358B02-A48D-A50E-F710-39C1636C30F6@My Company")
        );
        assert_eq!(
            get("redirect_uri"),
            Some("https://connect.example.com/settings/acumaticacallback")
        );
        assert_eq!(get("scope"), Some("api offline_access"));
        assert_eq!(get("state"), Some("st&ate"));
        assert_eq!(get("code_challenge"), Some("CHALLENGE"));
        assert_eq!(get("code_challenge_method"), Some("S256"));
        assert!(u.contains("client_id=88358B02-A48D-A50E-F710-39C1636C30F6%40My+Company"));
    }

    #[test]
    fn pkce_challenge_is_s256_of_the_verifier() {
        let (verifier, challenge) = pkce_pair();
        let digest = Sha256::digest(verifier.expose().as_bytes());
        let want = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        assert_eq!(challenge, want);
        assert!(verifier.expose().len() >= 43);
        assert_ne!(pkce_pair().0, verifier);
    }
}
