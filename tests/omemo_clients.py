"""Two independent OMEMO clients for end-to-end tests through Parley.

- `SlixOmemo`: slixmpp-omemo (python-omemo with the oldmemo and twomemo backends), as its own
  documentation says to use it: an XEP_0384 subclass with a storage backend. It publishes its device
  lists and bundles for both namespaces through PEP with publish-options.
- `GajimOmemo`: omemo-dr, Gajim's OMEMO library, which only does cryptography; the XMPP side Gajim
  gives it (devicelist and bundle publication, bundle download, message XML of
  eu.siacs.conversations.axolotl) is written here after XEP-0384 0.3.

Keys live in memory, per account and resource, so a client that reconnects keeps its identity.
"""

from __future__ import annotations

import base64
from typing import Any
from xml.etree.ElementTree import Element, SubElement, fromstring

from omemo.storage import Just, Maybe, Nothing, Storage
from omemo_dr.const import OMEMOTrust
from omemo_dr.identitykey import IdentityKey
from omemo_dr.identitykeypair import IdentityKeyPair
from omemo_dr.session_manager import OMEMOSessionManager
from omemo_dr.state.prekeyrecord import PreKeyRecord
from omemo_dr.state.sessionrecord import SessionRecord
from omemo_dr.state.signedprekeyrecord import SignedPreKeyRecord
from omemo_dr.state.store import Store
from omemo_dr.structs import IdentityInfo, OMEMOBundle, OMEMOConfig, OMEMOMessage
from slixmpp import ClientXMPP
from slixmpp.plugins.base import register_plugin
from slixmpp_omemo import XEP_0384

AXOLOTL = "eu.siacs.conversations.axolotl"
DEVICELIST = f"{AXOLOTL}.devicelist"
PUBSUB = "http://jabber.org/protocol/pubsub"
OPEN_ACCESS = (f"<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
               f"<value>{PUBSUB}#publish-options</value></field><field var='pubsub#access_model'>"
               f"<value>open</value></field></x></publish-options>")

# Key material of every test client, by full JID; tests clear it.
KEYS: dict[str, Any] = {}


class MemoryStorage(Storage):
    """python-omemo's key-value storage, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, Any] = {}

    async def _load(self, key: str) -> Maybe[Any]:
        return Just(self.data[key]) if key in self.data else Nothing()

    async def _store(self, key: str, value: Any) -> None:
        self.data[key] = value

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)


class SlixOmemo(XEP_0384):
    """slixmpp-omemo with blind trust before verification and in-memory keys."""

    @property
    def storage(self) -> Storage:
        return KEYS.setdefault(f"slix {self.xmpp.boundjid.full}", MemoryStorage())

    @property
    def _btbv_enabled(self) -> bool:
        return True

    async def _prompt_manual_trust(self, manually_trusted: Any, identifier: Any) -> None:
        raise AssertionError("blind trust needs no manual decision")


register_plugin(SlixOmemo)


class MemoryStore(Store):
    """omemo-dr's store, in memory; every identity is trusted (the tests check transport, not trust)."""

    def __init__(self) -> None:
        self.device_id: int | None = None
        self.identity: IdentityKeyPair | None = None
        self.pre_keys: dict[int, PreKeyRecord] = {}
        self.signed: dict[int, SignedPreKeyRecord] = {}
        self.sessions: dict[tuple[str, int], bytes] = {}
        self.identities: dict[str, set[bytes]] = {}
        self.active: dict[str, set[int]] = {}

    def set_our_identity(self, device_id: int, identity_key_pair: IdentityKeyPair) -> None:
        self.device_id, self.identity = device_id, identity_key_pair

    def get_identity_key_pair(self) -> IdentityKeyPair:
        assert self.identity is not None
        return self.identity

    def get_our_device_id(self) -> int:
        assert self.device_id is not None
        return self.device_id

    def save_identity(self, recipient_id: str, identity_key: IdentityKey) -> None:
        self.identities.setdefault(recipient_id, set()).add(identity_key.serialize())

    def delete_identity(self, recipient_id: str, identity_key: IdentityKey) -> None:
        self.identities.get(recipient_id, set()).discard(identity_key.serialize())

    def is_trusted_identity(self, recipient_id: str, identity_key: IdentityKey) -> bool:
        return True

    def set_trust(self, recipient_id: str, identity_key: IdentityKey, trust: OMEMOTrust) -> None:
        pass

    def set_identity_last_seen(self, recipient_id: str, identity_key: IdentityKey) -> None:
        pass

    def get_identity_infos(self, recipient_ids: str | list[str]) -> list[IdentityInfo]:
        return []

    def get_pre_key_count(self) -> int:
        return len(self.pre_keys)

    def load_pre_key(self, pre_key_id: int) -> PreKeyRecord:
        return self.pre_keys[pre_key_id]

    def load_pending_pre_keys(self) -> list[PreKeyRecord]:
        return list(self.pre_keys.values())

    def get_current_pre_key_id(self) -> int | None:
        return max(self.pre_keys, default=None)

    def store_pre_key(self, pre_key_id: int, pre_key_record: PreKeyRecord) -> None:
        self.pre_keys[pre_key_id] = pre_key_record

    def contains_pre_key(self, pre_key_id: int) -> bool:
        return pre_key_id in self.pre_keys

    def remove_pre_key(self, pre_key_id: int) -> None:
        self.pre_keys.pop(pre_key_id, None)

    def load_signed_pre_key(self, signed_pre_key_id: int) -> SignedPreKeyRecord:
        return self.signed[signed_pre_key_id]

    def load_signed_pre_keys(self) -> list[SignedPreKeyRecord]:
        return list(self.signed.values())

    def store_signed_pre_key(self, signed_pre_key_id: int, signed_pre_key_record: SignedPreKeyRecord) -> None:
        self.signed[signed_pre_key_id] = signed_pre_key_record

    def contains_signed_pre_key(self, signed_pre_key_id: int) -> bool:
        return signed_pre_key_id in self.signed

    def get_current_signed_pre_key_id(self) -> int:
        return max(self.signed)

    def get_signed_pre_key_timestamp(self, signed_pre_key_id: int) -> int:
        return self.signed[signed_pre_key_id].get_timestamp()

    def remove_old_signed_pre_keys(self, timestamp: int) -> None:
        current = self.get_current_signed_pre_key_id()
        for key_id, record in list(self.signed.items()):
            if key_id != current and record.get_timestamp() < timestamp:
                del self.signed[key_id]

    def remove_signed_pre_key(self, signed_pre_key_id: int) -> None:
        self.signed.pop(signed_pre_key_id, None)

    def load_session(self, recipient_id: str, device_id: int) -> SessionRecord:
        stored = self.sessions.get((recipient_id, device_id))
        return SessionRecord(serialized=stored) if stored else SessionRecord()

    def store_session(self, recipient_id: str, device_id: int, session_record: SessionRecord) -> None:
        self.sessions[(recipient_id, device_id)] = session_record.serialize()

    def contains_session(self, recipient_id: str, device_id: int) -> bool:
        return (recipient_id, device_id) in self.sessions

    def get_inactive_sessions_keys(self, recipient_id: str) -> list[IdentityKey]:
        return []

    def delete_session(self, recipient_id: str, device_id: int) -> None:
        self.sessions.pop((recipient_id, device_id), None)

    def delete_all_sessions(self, recipient_id: str) -> None:
        for key in [k for k in self.sessions if k[0] == recipient_id]:
            del self.sessions[key]

    def get_active_device_tuples(self) -> list[tuple[str, int]]:
        return [(address, device) for address, devices in self.active.items() for device in devices]

    def get_trust_for_identity(self, recipient_id: str, identity_key: IdentityKey) -> OMEMOTrust | None:
        return OMEMOTrust.BLIND

    def get_unacknowledged_count(self, recipient_id: str, device_id: int) -> int:
        return 0

    def set_active_state(self, address: str, devicelist: list[int]) -> None:
        self.active[address] = set(devicelist)

    def set_inactive(self, address: str, device_id: int) -> None:
        self.active.get(address, set()).discard(device_id)

    def is_trusted(self, recipient_id: str, device_id: int) -> bool:
        return True

    def needs_init(self) -> bool:
        return self.device_id is None


CONFIG = OMEMOConfig(default_prekey_amount=100, min_prekey_amount=80, spk_archive_seconds=30 * 86400,
                     spk_cycle_seconds=7 * 86400, unacknowledged_count=2000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class GajimOmemo:
    """An omemo-dr session manager and the legacy-OMEMO XMPP glue, on a slixmpp connection."""

    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.jid = client.boundjid.bare
        store = KEYS.setdefault(f"dr {client.boundjid.full}", MemoryStore())
        self.manager = OMEMOSessionManager(self.jid, store, CONFIG)
        self.device_id = self.manager.get_our_device()

    async def iq(self, type_: str, xml: str, to: str | None = None) -> Element:
        iq = self.client.Iq(stype=type_)
        if to:
            iq["to"] = to
        iq.append(fromstring(xml))
        return (await iq.send(timeout=10)).xml

    async def publish(self) -> None:
        """The device list and the bundle, each on its node with open access (XEP-0384 0.3 section 4.3)."""
        devices = f"<list xmlns='{AXOLOTL}'><device id='{self.device_id}'/></list>"
        await self.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{DEVICELIST}'><item id='current'>"
                             f"{devices}</item></publish>{OPEN_ACCESS}</pubsub>")
        bundle = self.manager.get_bundle(AXOLOTL)
        prekeys = "".join(f"<preKeyPublic preKeyId='{k['id']}'>{b64(k['key'])}</preKeyPublic>" for k in bundle.otpks)
        xml = (f"<bundle xmlns='{AXOLOTL}'>"
               f"<signedPreKeyPublic signedPreKeyId='{bundle.spk['id']}'>{b64(bundle.spk['key'])}</signedPreKeyPublic>"
               f"<signedPreKeySignature>{b64(bundle.spk_signature)}</signedPreKeySignature>"
               f"<identityKey>{b64(bundle.ik)}</identityKey><prekeys>{prekeys}</prekeys></bundle>")
        await self.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{AXOLOTL}.bundles:{self.device_id}'>"
                             f"<item id='current'>{xml}</item></publish>{OPEN_ACCESS}</pubsub>")

    async def fetch(self, jid: str) -> None:
        """The contact's device list and a session with each device, from the bundles in its PEP."""
        result = await self.iq("get", f"<pubsub xmlns='{PUBSUB}'><items node='{DEVICELIST}' max_items='1'/>"
                                      "</pubsub>", jid)
        devices = [int(d.get("id", "0")) for d in result.iter(f"{{{AXOLOTL}}}device")]
        self.manager.update_devicelist(jid, devices)
        for device in devices:
            found = await self.iq("get", f"<pubsub xmlns='{PUBSUB}'><items node='{AXOLOTL}.bundles:{device}' "
                                         "max_items='1'/></pubsub>", jid)
            bundle = found.find(f".//{{{AXOLOTL}}}bundle")
            assert bundle is not None
            spk = bundle.find(f"{{{AXOLOTL}}}signedPreKeyPublic")
            assert spk is not None
            self.manager.build_session(jid, OMEMOBundle(
                device_id=device, namespace=AXOLOTL,
                ik=base64.b64decode(bundle.findtext(f"{{{AXOLOTL}}}identityKey") or ""),
                spk={"id": int(spk.get("signedPreKeyId", "0")), "key": base64.b64decode(spk.text or "")},
                spk_signature=base64.b64decode(bundle.findtext(f"{{{AXOLOTL}}}signedPreKeySignature") or ""),
                otpks=[{"id": int(k.get("preKeyId", "0")), "key": base64.b64decode(k.text or "")}
                       for k in bundle.iter(f"{{{AXOLOTL}}}preKeyPublic")]))

    def encrypt(self, to: str, text: str) -> Element:
        """An <encrypted/> element carrying `text` for every device of `to`."""
        message = self.manager.encrypt(to, text, groupchat=False)
        assert message is not None, "no device to encrypt for"
        encrypted = Element(f"{{{AXOLOTL}}}encrypted")
        header = SubElement(encrypted, f"{{{AXOLOTL}}}header", {"sid": str(message.sid)})
        for rid, (key, prekey) in message.keys.items():
            attrs = {"rid": str(rid), **({"prekey": "true"} if prekey else {})}
            SubElement(header, f"{{{AXOLOTL}}}key", attrs).text = b64(key)
        SubElement(header, f"{{{AXOLOTL}}}iv").text = b64(message.iv)
        SubElement(encrypted, f"{{{AXOLOTL}}}payload").text = b64(message.payload or b"")
        return encrypted

    def decrypt(self, message: Element) -> str:
        encrypted = message.find(f"{{{AXOLOTL}}}encrypted")
        assert encrypted is not None, "not an OMEMO message"
        header = encrypted.find(f"{{{AXOLOTL}}}header")
        assert header is not None
        keys = {int(k.get("rid", "0")): (base64.b64decode(k.text or ""), k.get("prekey") in ("true", "1"))
                for k in header.iter(f"{{{AXOLOTL}}}key")}
        payload = encrypted.findtext(f"{{{AXOLOTL}}}payload")
        omemo_message = OMEMOMessage(sid=int(header.get("sid", "0")), keys=keys,
                                     iv=base64.b64decode(header.findtext(f"{{{AXOLOTL}}}iv") or ""),
                                     payload=base64.b64decode(payload) if payload else None)
        sender = (message.get("from") or "").split("/")[0]
        text, _fingerprint, _trust = self.manager.decrypt_message(omemo_message, sender)
        return text
