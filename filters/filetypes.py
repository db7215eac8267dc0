"""True-type identification for the attachment_types filter.

Policy clause: "employees may not install software" — software is recognised
by what its bytes are, not by what its name or Content-Type claim.

:func:`identify` maps leading bytes (plus, when known, the last 512 bytes and
libmagic's verdict on the first 8 KiB) to a *kind*: a short token such as
``"pe"``, ``"iso"`` or ``"zip"``.  It is pure and cheap: direct signature
checks first (several formats libmagic misses in a short prefix, e.g. ISO 9660
whose descriptor sits at offset 32769, truncated MSI files, VHDX, OneNote, DMG
trailers), then libmagic's MIME type and description as a fallback.

:data:`KINDS` says, for every kind, its policy category (``None`` for kinds
that are not blocked as such), a human label, and the file extensions that
honestly carry it.  The extension tables below say which names are blocked by
category.  Nothing here does I/O or holds state.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

#: Bytes libmagic is fed (it needs no more for the formats we care about).
MAGIC_BYTES = 8 * 1024
#: Leading bytes kept for direct checks: ISO 9660 / UDF volume descriptors sit
#: at 0x8001, 0x8801 and 0x9001, so 40 KiB covers them with room to spare.
HEAD_BYTES = 40 * 1024
#: Trailing bytes kept for direct checks (DMG "koly" trailer, VHD footer).
TAIL_BYTES = 512

#: Policy categories, in the order they are documented.
CATEGORIES = (
    "executable",
    "installer",
    "script",
    "disk_image",
    "onenote",
    "double_extension",
    "deceptive_name",
)


@dataclass(frozen=True, slots=True)
class Kind:
    """What a kind of file is, for policy purposes."""

    category: str | None
    label: str
    extensions: frozenset[str] = frozenset()


def _k(category: str | None, label: str, *exts: str) -> Kind:
    return Kind(category, label, frozenset(exts))


KINDS: dict[str, Kind] = {
    # executables and libraries
    "pe": _k("executable", "Windows executable (PE)",
             "exe", "dll", "com", "scr", "cpl", "ocx", "sys", "drv", "efi", "pif", "xll", "mui"),
    "msdos": _k("executable", "MS-DOS executable", "exe", "com"),
    "elf": _k("executable", "ELF executable", "so", "elf", "bin", "o", "ko", "axf", "out"),
    "macho": _k("executable", "Mach-O executable", "dylib", "bundle", "o", "bin"),
    # installers
    "msi": _k("installer", "Windows Installer package (MSI)", "msi", "msp", "mst"),
    "msix": _k("installer", "MSIX/AppX package",
               "msix", "msixbundle", "appx", "appxbundle"),
    "apk": _k("installer", "Android package (APK)", "apk"),
    "deb": _k("installer", "Debian package", "deb", "udeb"),
    "rpm": _k("installer", "RPM package", "rpm"),
    "xar": _k("installer", "macOS installer package (xar)", "pkg", "mpkg", "xar", "xip"),
    "dmg": _k("installer", "macOS disk image (DMG)", "dmg"),
    # scripts and other things that run when opened
    "lnk": _k("script", "Windows shortcut (LNK)", "lnk"),
    "batch": _k("script", "DOS batch file", "bat", "cmd"),
    "jar": _k("script", "Java archive (JAR)", "jar"),
    "java-class": _k("script", "compiled Java class", "class"),
    "chm": _k("script", "compiled HTML help (CHM)", "chm"),
    # disk images
    "iso": _k("disk_image", "ISO 9660 disk image", "iso", "img"),
    "udf": _k("disk_image", "UDF disk image", "iso", "img", "udf"),
    "vhd": _k("disk_image", "virtual hard disk (VHD)", "vhd"),
    "vhdx": _k("disk_image", "virtual hard disk (VHDX)", "vhdx"),
    "vmdk": _k("disk_image", "VMware disk image (VMDK)", "vmdk"),
    "qcow": _k("disk_image", "QEMU disk image (QCOW)", "qcow", "qcow2"),
    "wim": _k("disk_image", "Windows imaging format (WIM)", "wim", "esd", "swm"),
    "mbr": _k("disk_image", "raw disk image (boot sector)", "img", "ima", "bin"),
    # OneNote
    "onenote": _k("onenote", "OneNote document", "one"),
    # archives we look inside
    "zip": _k(None, "Zip archive", "zip"),
    "7z": _k(None, "7-Zip archive", "7z"),
    "rar": _k(None, "RAR archive", "rar"),
    "tar": _k(None, "tar archive", "tar"),
    "gzip": _k(None, "gzip compressed data", "gz", "tgz"),
    "bzip2": _k(None, "bzip2 compressed data", "bz2", "tbz", "tbz2"),
    "xz": _k(None, "xz compressed data", "xz", "txz"),
    "tnef": _k(None, "TNEF (winmail.dat)", "dat", "tnef"),
    # archives no well-kept library here can read: held as unscannable
    "cab": _k(None, "Microsoft Cabinet archive", "cab"),
    "arj": _k(None, "ARJ archive", "arj"),
    "ace": _k(None, "ACE archive", "ace"),
    "arc": _k(None, "ARC archive", "arc"),
    "zoo": _k(None, "Zoo archive", "zoo"),
    "lzh": _k(None, "LHA archive", "lzh", "lha"),
    "lz4": _k(None, "LZ4 compressed data", "lz4"),
    "zstd": _k(None, "Zstandard compressed data", "zst"),
    "ar": _k(None, "ar archive", "a", "ar"),
    "cpio": _k(None, "cpio archive", "cpio"),
    "stuffit": _k(None, "StuffIt archive", "sit", "sitx"),
    # documents (macro candidates)
    "ole": _k(None, "OLE2 compound document", "doc", "xls", "ppt", "dot", "xlt", "pot", "msg"),
    "ooxml": _k(None, "Office Open XML document",
                "docx", "docm", "xlsx", "xlsm", "pptx", "pptm", "dotx", "dotm", "xltx",
                "xltm", "potx", "potm", "ppsx", "ppsm", "xlam", "ppam", "vsdx"),
    "odf": _k(None, "OpenDocument file", "odt", "ods", "odp", "odg", "ott", "ots", "otp"),
    "epub": _k(None, "EPUB document", "epub"),
    "sylk": _k(None, "SYLK spreadsheet", "slk"),
}

#: Archive kinds whose members are listed (and, where possible, read).
ARCHIVE_KINDS = frozenset({"zip", "7z", "rar", "tar", "gzip", "bzip2", "xz", "tnef"})
#: Archive kinds we cannot open: held as unscannable.
UNSUPPORTED_ARCHIVE_KINDS = frozenset(
    {"cab", "arj", "ace", "arc", "zoo", "lzh", "lz4", "zstd", "ar", "cpio", "stuffit"}
)
#: Kinds whose whole content is needed (to look inside, or to check macros).
NEEDS_CONTENT = ARCHIVE_KINDS | {"ole", "sylk"}
#: Zip-based document/package kinds (see :func:`zip_flavour`).
ZIP_FLAVOURS = frozenset({"jar", "apk", "msix", "ooxml", "odf", "epub"})

# ---------------------------------------------------------------- name tables

#: Extensions blocked by name, per category (lower case, no dot).
CATEGORY_EXTENSIONS: dict[str, frozenset[str]] = {
    "executable": frozenset({
        "exe", "dll", "com", "pif", "scr", "cpl", "ocx", "efi", "xll",
        "so", "dylib", "elf", "app", "gadget",
    }),
    "installer": frozenset({
        "msi", "msp", "mst", "msix", "msixbundle", "appx", "appxbundle", "appinstaller",
        "application", "deb", "udeb", "rpm", "pkg", "mpkg", "xip", "dmg", "apk", "snap",
    }),
    "script": frozenset({
        "js", "jse", "vbs", "vbe", "vb", "wsf", "wsc", "wsh", "ws", "hta", "ps1", "ps1xml",
        "ps2", "ps2xml", "psc1", "psc2", "psm1", "psd1", "msh", "msh1", "msh2", "mshxml",
        "bat", "cmd", "lnk", "url", "scf", "shs", "shb", "inf", "reg", "sct", "jar", "jnlp",
        "class", "chm", "xbap", "appref-ms", "settingcontent-ms", "command", "scpt",
        "applescript", "workflow",
    }),
    "disk_image": frozenset({"iso", "img", "vhd", "vhdx", "vmdk", "udf", "wim", "qcow2"}),
    "onenote": frozenset({"one", "onepkg"}),
}

#: Extensions people trust; seen *before* a blocked extension they make a
#: double extension (``invoice.pdf.exe``).
DECOY_EXTENSIONS = frozenset({
    "pdf", "doc", "docx", "docm", "xls", "xlsx", "xlsm", "ppt", "pptx", "rtf", "txt", "csv",
    "odt", "ods", "odp", "htm", "html", "xml", "jpg", "jpeg", "png", "gif", "bmp", "tif",
    "tiff", "webp", "heic", "svg", "mp3", "mp4", "m4a", "wav", "avi", "mov", "mkv", "wmv",
    "zip", "rar", "7z", "eml", "msg", "ics", "vcf",
})

#: libmagic MIME types that name a kind outright (fallback after direct checks).
_MIME_KINDS = {
    "application/vnd.microsoft.portable-executable": "pe",
    "application/x-dosexec": "msdos",
    "application/x-msdownload": "pe",
    "application/x-executable": "elf",
    "application/x-sharedlib": "elf",
    "application/x-pie-executable": "elf",
    "application/x-object": "elf",
    "application/x-coredump": "elf",
    "application/x-mach-binary": "macho",
    "application/x-msi": "msi",
    "application/vnd.debian.binary-package": "deb",
    "application/x-rpm": "rpm",
    "application/x-xar": "xar",
    "application/x-apple-diskimage": "dmg",
    "application/x-ms-shortcut": "lnk",
    "text/x-msdos-batch": "batch",
    "application/x-java-applet": "java-class",
    "application/vnd.ms-htmlhelp": "chm",
    "application/x-iso9660-image": "iso",
    "application/x-ms-wim": "wim",
    "application/x-qemu-disk": "qcow",
    "application/onenote": "onenote",
    "application/zip": "zip",
    "application/java-archive": "jar",
    "application/vnd.android.package-archive": "apk",
    "application/x-7z-compressed": "7z",
    "application/x-rar": "rar",
    "application/vnd.rar": "rar",
    "application/x-tar": "tar",
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-bzip2": "bzip2",
    "application/x-xz": "xz",
    "application/vnd.ms-cab-compressed": "cab",
    "application/x-arj": "arj",
    "application/x-ace-compressed": "ace",
    "application/x-arc": "arc",
    "application/x-zoo": "zoo",
    "application/x-lha": "lzh",
    "application/x-lzh-compressed": "lzh",
    "application/x-lz4": "lz4",
    "application/x-lz4+json": "lz4",
    "application/zstd": "zstd",
    "application/x-archive": "ar",
    "application/x-cpio": "cpio",
    "application/x-stuffit": "stuffit",
    "application/x-ole-storage": "ole",
    "application/msword": "ole",
    "application/vnd.ms-excel": "ole",
    "application/vnd.ms-powerpoint": "ole",
    "application/vnd.ms-outlook": "ole",
    "application/x-sylk": "sylk",
    "application/epub+zip": "epub",
    "application/vnd.ms-tnef": "tnef",
}

# Compound-document root CLSIDs of Windows Installer files (MSI, MSP, MST).
_MSI_CLSIDS = frozenset({
    uuid.UUID("000c1084-0000-0000-c000-000000000046"),
    uuid.UUID("000c1086-0000-0000-c000-000000000046"),
    uuid.UUID("000c1082-0000-0000-c000-000000000046"),
})
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ONENOTE_GUID = bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3")
_LNK_HEADER = bytes.fromhex("4c0000000114020000000000c000000000000046")
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xcf\xfa\xed\xfe")


def _ole_root_clsid(head: bytes) -> uuid.UUID | None:
    """The root storage CLSID of an OLE2 file, read straight from the header
    (works on files too short or damaged for a full parser)."""
    if len(head) < 0x200:
        return None
    shift = struct.unpack_from("<H", head, 0x1E)[0]
    if shift not in (9, 12):
        return None
    sector = 1 << shift
    first_dir = struct.unpack_from("<I", head, 0x30)[0]
    if first_dir >= 0xFFFFFFFA:
        return None
    off = (first_dir + 1) * sector
    if off + 0x60 > len(head):
        return None
    return uuid.UUID(bytes_le=head[off + 0x50 : off + 0x60])


def _pe_offset_ok(head: bytes) -> bool | None:
    """True: PE signature at e_lfanew; False: not there; None: beyond ``head``."""
    if len(head) < 0x40:
        return False
    lfanew = struct.unpack_from("<I", head, 0x3C)[0]
    if lfanew + 4 > len(head):
        return None if lfanew < 0x10000000 else False
    return head[lfanew : lfanew + 4] == b"PE\0\0"


def identify(head: bytes, tail: bytes = b"", magic_mime: str = "", magic_desc: str = "") -> str | None:
    """The kind of a file from its leading bytes (and trailing bytes when the
    whole file is known), with libmagic's verdict as a fallback.  Pure."""
    h4 = head[:4]
    if head[:2] == b"MZ":
        pe = _pe_offset_ok(head)
        if pe or (pe is None and "PE32" in magic_desc):
            return "pe"
        if magic_mime in ("application/x-dosexec", "application/vnd.microsoft.portable-executable"):
            return "pe" if "PE32" in magic_desc else "msdos"
        if magic_desc.startswith("MS-DOS executable"):
            return "msdos"
    if h4 == b"\x7fELF":
        return "elf"
    if h4 in _MACHO_MAGICS:
        return "macho"
    if h4 == b"\xca\xfe\xba\xbe" and len(head) >= 8:
        # Shared by fat Mach-O (arch count) and Java classes (version >= 45).
        return "macho" if 0 < struct.unpack_from(">I", head, 4)[0] < 45 else "java-class"
    if head[:8] == _OLE_MAGIC:
        if _ole_root_clsid(head) in _MSI_CLSIDS or "MSI Installer" in magic_desc:
            return "msi"
        return "ole"
    if head[:16] == _ONENOTE_GUID:
        return "onenote"
    if head[:20] == _LNK_HEADER:
        return "lnk"
    for off in (0x8001, 0x8801, 0x9001):
        sig = head[off : off + 5]
        if sig == b"CD001":
            return "iso"
        if sig in (b"BEA01", b"NSR02", b"NSR03"):
            return "udf"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix" or tail[-512:].startswith(b"conectix"):
        return "vhd"
    if h4 == b"KDMV" or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if h4 == b"QFI\xfb":
        return "qcow"
    if head[:8] == b"MSWIM\0\0\0":
        return "wim"
    if len(tail) >= 512 and tail[-512:-508] == b"koly":
        return "dmg"
    if h4 == b"xar!":
        return "xar"
    if head[:8] == b"!<arch>\n":
        return "deb" if head[8:21] == b"debian-binary" else "ar"
    if h4 == b"\xed\xab\xee\xdb":
        return "rpm"
    if h4 == b"ITSF":
        return "chm"
    if h4 in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z"
    if head[:7] == b"Rar!\x1a\x07\x00" or head[:8] == b"Rar!\x1a\x07\x01\x00":
        return "rar"
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (
        b"1AY&SY", b"\x17rE8P\x90"
    ):
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:8] == b"MSCF\0\0\0\0":
        return "cab"
    if h4 == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if h4 == b"\x04\x22\x4d\x18":
        return "lz4"
    if head.startswith(b"ID;P"):
        return "sylk"
    if h4 == b"\x78\x9f\x3e\x22":
        return "tnef"
    kind = _MIME_KINDS.get(magic_mime)
    if kind is not None:
        return kind
    if magic_desc.startswith("DOS/MBR boot sector"):
        return "mbr"
    if "tar archive" in magic_desc:
        return "tar"
    return None


def zip_flavour(names: Iterable[str]) -> str | None:
    """Which zip-based package a zip is, from its member names (or None)."""
    lower = {n.lower() for n in names}
    if "androidmanifest.xml" in lower and any(n.endswith(".dex") for n in lower):
        return "apk"
    if (
        "appxmanifest.xml" in lower
        or "appxmetadata/appxbundlemanifest.xml" in lower
        or "appxblockmap.xml" in lower
    ):
        return "msix"
    if "meta-inf/manifest.mf" in lower:  # JAR (also WAR/EAR/AAR): Java code
        return "jar"
    if "[content_types].xml" in lower:
        return "ooxml"
    if "mimetype" in lower:
        return "epub" if "meta-inf/container.xml" in lower and not any(
            n == "content.xml" for n in lower
        ) else "odf"
    return None


#: MIME types for kinds libmagic reports generically (octet-stream, plain
#: zip, OLE storage, text) — so that the log's "true type" says what it is.
_KIND_MIME = {
    "pe": "application/vnd.microsoft.portable-executable",
    "msdos": "application/x-dosexec",
    "msi": "application/x-msi",
    "msix": "application/msix",
    "apk": "application/vnd.android.package-archive",
    "jar": "application/java-archive",
    "dmg": "application/x-apple-diskimage",
    "iso": "application/x-iso9660-image",
    "udf": "application/x-udf-image",
    "vhd": "application/x-vhd",
    "vhdx": "application/x-vhdx",
    "vmdk": "application/x-vmdk",
    "onenote": "application/onenote",
    "tar": "application/x-tar",
    "tnef": "application/vnd.ms-tnef",
    "lnk": "application/x-ms-shortcut",
    "cab": "application/vnd.ms-cab-compressed",
}
_GENERIC_MIMES = frozenset({
    "", "application/octet-stream", "text/plain", "application/zip", "application/x-ole-storage",
    "application/zlib", "application/java-archive",
})


def true_mime(kind: str | None, magic_mime: str) -> str:
    """libmagic's MIME type, made specific where we know better."""
    if kind in _KIND_MIME and magic_mime in _GENERIC_MIMES:
        return _KIND_MIME[kind]
    return magic_mime or "application/octet-stream"


def label(kind: str | None) -> str:
    """A human label for a kind."""
    if kind is None:
        return "unknown"
    info = KINDS.get(kind)
    return info.label if info else kind
