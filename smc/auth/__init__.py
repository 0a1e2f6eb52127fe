"""Authentication and authorization of SMC's control plane.

Role: public API of :mod:`smc.auth`. Principals and accesses (:class:`Principal`,
:class:`Access`); the local admin credential and client credential files
(:class:`LocalCredential`, :class:`ClientCredentials`); the API's TLS material and client
certificates (:class:`ApiTLS`, :func:`server_context`); Kubernetes TokenReview and
SubjectAccessReview clients with caches (:class:`TokenReviewer`, :class:`AccessReviewer`);
access grants on the log (:class:`GrantAuthorizer`); and the aiohttp door
(:class:`Guard`, :class:`Authenticator`, :func:`open_door`). See docs/security.md.
Concurrency: see each module.
"""

from smc.auth._door import Door, open_door
from smc.auth._errors import (
    AuthError,
    CredentialError,
    Forbidden,
    ReviewUnavailable,
    Unauthenticated,
)
from smc.auth._files import config_root, server_dir, write_private
from smc.auth._grants import (
    GRANT_API_VERSION,
    GRANT_KIND,
    Grant,
    GrantAuthorizer,
    GrantError,
    parse_grant,
)
from smc.auth._guard import GUARD, PRINCIPAL, PUBLIC_PATHS, Authenticator, Authorizer, Guard
from smc.auth._kube import (
    API_GROUP,
    AccessReviewer,
    TokenReviewer,
    TTLCache,
    token_digest,
    token_expiry,
)
from smc.auth._local import ADMIN_NAME, TOKEN_PREFIX, ClientCredentials, LocalCredential
from smc.auth._principal import (
    ADMINS_GROUP,
    AUTHENTICATED_GROUP,
    VERBS,
    Access,
    Principal,
    actor_matches,
    resource_of_kind,
)
from smc.auth._tls import (
    ApiTLS,
    ClientRoots,
    ServingMaterial,
    principal_of_certificate,
    server_context,
)

__all__ = [
    "ADMINS_GROUP",
    "ADMIN_NAME",
    "API_GROUP",
    "AUTHENTICATED_GROUP",
    "GRANT_API_VERSION",
    "GRANT_KIND",
    "GUARD",
    "PRINCIPAL",
    "PUBLIC_PATHS",
    "TOKEN_PREFIX",
    "VERBS",
    "Access",
    "AccessReviewer",
    "ApiTLS",
    "AuthError",
    "Authenticator",
    "Authorizer",
    "ClientCredentials",
    "ClientRoots",
    "CredentialError",
    "Door",
    "Forbidden",
    "Grant",
    "GrantAuthorizer",
    "GrantError",
    "Guard",
    "LocalCredential",
    "Principal",
    "ReviewUnavailable",
    "ServingMaterial",
    "TTLCache",
    "TokenReviewer",
    "Unauthenticated",
    "actor_matches",
    "config_root",
    "open_door",
    "parse_grant",
    "principal_of_certificate",
    "resource_of_kind",
    "server_context",
    "server_dir",
    "token_digest",
    "token_expiry",
    "write_private",
]
