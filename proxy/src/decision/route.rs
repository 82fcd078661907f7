//! Route scopes: which of a client's plans applies to a request.

use portcullis_table::RouteScope;

/// True when `routes` admits the request (an empty list admits everything).
pub fn admits(routes: &[RouteScope], method: &str, path: &str) -> bool {
    routes.is_empty() || routes.iter().any(|r| r.matches(method, path))
}

/// Index of the first plan (in the client's order of precedence) whose routes admit the request.
pub fn first_matching<'a, I>(plans: I, method: &str, path: &str) -> Option<usize>
where
    I: IntoIterator<Item = &'a [RouteScope]>,
{
    plans.into_iter().position(|routes| admits(routes, method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(p: &str, m: &[&str]) -> RouteScope {
        RouteScope { path_prefix: p.into(), methods: m.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn first_plan_whose_scope_matches_wins() {
        let read = vec![scope("/v1", &["GET"])];
        let write = vec![scope("/v1/orders", &["POST", "PUT"])];
        let all: Vec<RouteScope> = vec![];
        let plans = [read.as_slice(), write.as_slice(), all.as_slice()];
        assert_eq!(first_matching(plans, "GET", "/v1/x"), Some(0));
        assert_eq!(first_matching(plans, "POST", "/v1/orders/7"), Some(1));
        assert_eq!(first_matching(plans, "DELETE", "/v2"), Some(2));
        assert_eq!(first_matching(plans[..2].iter().copied(), "DELETE", "/v2"), None);
        assert_eq!(first_matching(plans[..1].iter().copied(), "GET", "/v10"), None);
    }
}
