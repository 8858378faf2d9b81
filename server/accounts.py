"""Account operations shared by the CLI, in-band registration and admin commands.

Passwords are turned into SCRAM salted keys for every supported hash at once and never stored.
"""

from __future__ import annotations

import asyncio

from server.jid import JID, JIDError
from server.sasl.scram import HASHES, derive_credentials, verify_password
from server.storage import Storage
from server.storage.accounts import Account


class AccountError(ValueError):
    """A user-facing reason why an account operation was refused."""


class AccountsFull(AccountError):
    """The host is a tenant that has as many accounts as its quota allows."""


def prepare_username(username: str, host: str) -> str:
    try:
        local = JID.make(username, host).local
    except JIDError as exc:
        raise AccountError(f"invalid username {username!r}: {exc}") from None
    if local is None:
        raise AccountError("a username is required")
    return local


def check_password(password: str) -> None:
    if not password:
        raise AccountError("the password must not be empty")
    if len(password.encode()) > 1023:
        raise AccountError("the password is too long")


def credentials_for(password: str, iterations: int) -> list:
    try:
        return [derive_credentials(password, h, iterations=iterations) for h in HASHES]
    except ValueError as exc:
        raise AccountError(f"invalid password: {exc}") from None


async def create_account(storage: Storage, host: str, username: str, password: str, iterations: int) -> bool:
    """False when the account exists already; AccountsFull when the host is a tenant at its account quota
    (checked here, where every way of creating an account passes)."""
    check_password(password)
    user = prepare_username(username, host)
    tenant = await storage.tenants.get(host)
    limit = tenant.quotas.max_accounts if tenant is not None else 0
    if limit and await storage.accounts.count(host) >= limit:
        raise AccountsFull(f"{host} has reached its limit of {limit} accounts")
    return await storage.accounts.create(host, user, credentials_for(password, iterations))


async def set_password(storage: Storage, host: str, username: str, password: str, iterations: int) -> bool:
    """A new password ends the FAST tokens (XEP-0484) its devices got with the old one."""
    check_password(password)
    user = prepare_username(username, host)
    changed = await storage.accounts.set_credentials(host, user, credentials_for(password, iterations))
    if changed:
        await storage.fast.revoke(host, user)
    return changed


async def password_matches(storage: Storage, host: str, username: str, password: str) -> bool:
    """Check a plaintext password (HTTP Basic, check_password) against the stored SCRAM keys; a disabled
    account has no valid password."""
    account = await storage.accounts.get(host, username)
    if account is None or account.disabled:
        return False
    return await verify_plain(storage, account, password)


async def verify_plain(storage: Storage, account: Account, password: str) -> bool:
    """Check a plaintext password (SASL PLAIN, HTTP Basic) against the account's SCRAM keys.

    SHA-1 first: the cheaper hash, as Prosody checks it. PBKDF2 runs in a thread (it releases the GIL),
    so other clients are served meanwhile. An account that lacks a hash - imported from ejabberd or
    Prosody, which keep SHA-1 keys only - gets the missing keys from the right password, with the same
    salt and iteration count, so that SCRAM-SHA-256 works for it from then on.
    """
    creds = account.credentials.get("SHA-1") or account.credentials.get("SHA-256")
    if creds is None or not await asyncio.to_thread(verify_password, creds, password):
        return False
    missing = [h for h in HASHES if h not in account.credentials]
    if missing:
        derived = await asyncio.to_thread(
            lambda: [derive_credentials(password, h, creds.salt, creds.iterations) for h in missing])
        await storage.accounts.set_credentials(account.host, account.username,
                                               [*account.credentials.values(), *derived])
    return True
