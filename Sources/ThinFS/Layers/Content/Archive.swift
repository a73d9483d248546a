import CArchive
import Foundation

/// Tar archives through libarchive: the only file that imports CArchive.
///
/// `ArchiveReader` reads tar, tar.gz and tar.zst (every filter libarchive has,
/// detected from the bytes, never from a file name), or, in `.raw` mode, the
/// decompressed byte stream itself (for digests). `ArchiveWriter` writes PAX
/// tar: nanosecond mtimes and `SCHILY.xattr.*` records come out as GNU tar and
/// containerd read them. Tar is never parsed by hand.
///
/// Each class owns its `struct archive *` and frees it in `deinit`. Every
/// libarchive return code goes through `ArchiveHandle.check`, which throws an
/// `ArchiveError` naming the operation, the archive, the entry and
/// `archive_error_string`.
///
/// Names are bytes end to end: the writer hands libarchive each name's UTF-8
/// bytes as they are and the reader returns the bytes the archive holds, with
/// no Unicode normalization either way (see `ArchiveLocale`).

/// A libarchive failure, with what was being done to which archive and entry.
public struct ArchiveError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    /// The archive's path, or a name for a descriptor ("stdin", "fd 5").
    public var archive: String
    /// The entry being read or written, when there is one.
    public var entry: String?
    public var message: String

    public init(operation: String, archive: String, entry: String?, message: String) {
        self.operation = operation
        self.archive = archive
        self.entry = entry
        self.message = message
    }

    public var description: String {
        let at = entry.map { "entry '\($0)' of " } ?? ""
        return "\(operation): \(at)\(archive): \(message)"
    }
}

/// One tar entry's header, independent of libarchive.
public struct ArchiveEntry: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        case regular, directory, symlink, hardlink, characterDevice, blockDevice, fifo, socket
    }

    public struct Xattr: Equatable, Sendable {
        public var name: String
        public var value: [UInt8]
        public init(name: String, value: [UInt8]) {
            self.name = name
            self.value = value
        }
    }

    /// The name as stored (not cleaned: callers decide what a hostile name means).
    public var path: String
    public var kind: Kind
    /// Permission bits with set-user-ID, set-group-ID and sticky (mode & 0o7777).
    public var permissions: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var mtime: Timestamp
    /// Bytes of data that follow the header (0 for hard links and non-regular files).
    public var size: UInt64
    /// For `.symlink`.
    public var symlinkTarget: String?
    /// For `.hardlink`: the name of an earlier entry (or an existing file) to link to.
    public var hardlinkTarget: String?
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    /// In archive order; security.capability included.
    public var xattrs: [Xattr]

    public init(path: String, kind: Kind, permissions: UInt32, uid: UInt32 = 0, gid: UInt32 = 0,
                mtime: Timestamp = Timestamp(seconds: 0, nanoseconds: 0), size: UInt64 = 0,
                symlinkTarget: String? = nil, hardlinkTarget: String? = nil,
                deviceMajor: UInt32 = 0, deviceMinor: UInt32 = 0, xattrs: [Xattr] = []) {
        self.path = path
        self.kind = kind
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size
        self.symlinkTarget = symlinkTarget
        self.hardlinkTarget = hardlinkTarget
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
        self.xattrs = xattrs
    }

    /// The st_mode type bits of the entry (S_IFREG for hard links).
    public var typeBits: UInt32 {
        switch kind {
        case .regular, .hardlink: return 0o100000
        case .directory: return 0o040000
        case .symlink: return 0o120000
        case .characterDevice: return 0o020000
        case .blockDevice: return 0o060000
        case .fifo: return 0o010000
        case .socket: return 0o140000
        }
    }
}

/// archive_entry.h's AE_IF* values (its macros are casts, which Swift does not import); they are st_mode's.
private enum ArchiveFileType {
    static let regular: UInt32 = 0o100000
    static let directory: UInt32 = 0o040000
    static let symlink: UInt32 = 0o120000
    static let character: UInt32 = 0o020000
    static let block: UInt32 = 0o060000
    static let fifo: UInt32 = 0o010000
    static let socket: UInt32 = 0o140000
}

/// The LC_CTYPE each libarchive call runs under, set for the calling thread only (`uselocale`, as rpm does
/// around libarchive), so the process locale is never touched.
///
/// libarchive keeps each name in up to three forms (the locale's multibyte form, UTF-8, wide) and converts
/// between them through the calling thread's LC_CTYPE. Swift programs never call `setlocale`, so that is the
/// C locale, which holds no byte over 0x7f. There:
/// - a name set only in UTF-8 (`archive_entry_set_pathname_utf8`) has no multibyte form, and libarchive
///   3.6's pax writer passes the null it gets for one to `strlen`: `thinfs layer diff` died with SIGSEGV on
///   `café.txt` (libarchive issue #2233; PR #2856 turns the crash into an error in later releases). A symlink
///   target set that way came out empty, with no error;
/// - a multibyte name over 0x7f cannot be converted to the pax header's UTF-8, so the writer falls back
///   to `hdrcharset=BINARY` on every such entry, a keyword GNU tar warns about.
/// Hence:
/// - The writer sets the multibyte form itself (`archive_entry_copy_pathname` and friends, no conversion)
///   and runs under a UTF-8 LC_CTYPE, so the pax writer's UTF-8 "conversion" is a validated copy: a valid
///   UTF-8 name goes into a plain `path` record, byte for byte. (The `_utf8` setters are no better under a
///   UTF-8 locale: converting *from* UTF-8, libarchive normalizes to NFC, which would turn a decomposed
///   `cafe\u{301}` into `caf\u{e9}`, a different name on ext4.) Bytes that are not UTF-8 would take
///   libarchive's `hdrcharset=BINARY` fallback with the bytes unchanged, as GNU tar keeps them.
/// - The reader runs under the C locale whatever the process has set: there, libarchive cannot convert a
///   non-ASCII UTF-8 name to the locale and keeps the archive's bytes as the multibyte form, which `next()`
///   returns. Under a UTF-8 locale it would normalize them to NFC.
enum ArchiveLocale {
    /// nil where the C library has no C.UTF-8 (glibc has it built in since 2.35); the writer then keeps the
    /// bytes but marks non-ASCII entries `hdrcharset=BINARY`.
    nonisolated(unsafe) static let utf8: locale_t? = newlocale(Int32(LC_CTYPE_MASK), "C.UTF-8", nil)
    nonisolated(unsafe) static let c: locale_t? = newlocale(Int32(LC_CTYPE_MASK), "C", nil)

    /// Runs `body` with `locale` as this thread's locale, then restores the thread's previous one.
    static func with<T, E: Error>(_ locale: locale_t?, _ body: () throws(E) -> T) throws(E) -> T {
        guard let locale else { return try body() }
        let saved = uselocale(locale)
        defer { uselocale(saved) }
        return try body()
    }
}

/// The return-code checker shared by the reader and the writer.
final class ArchiveHandle {
    let pointer: OpaquePointer
    let name: String
    private let free: (OpaquePointer) -> Int32

    init(_ pointer: OpaquePointer, name: String, free: @escaping (OpaquePointer) -> Int32) {
        self.pointer = pointer
        self.name = name
        self.free = free
    }

    deinit { _ = free(pointer) }

    func error(_ operation: String, entry: String?, fallback: String = "unknown error") -> ArchiveError {
        let text = archive_error_string(pointer).map { String(cString: $0) } ?? fallback
        return ArchiveError(operation: operation, archive: name, entry: entry, message: text)
    }

    /// ARCHIVE_OK, ARCHIVE_EOF and ARCHIVE_WARN pass (warnings are about lossy conversions, which the
    /// caller sees in the values it gets); ARCHIVE_RETRY, ARCHIVE_FAILED and ARCHIVE_FATAL throw.
    /// Byte counts (>= 0 from the data calls) pass through.
    @discardableResult
    func check<T: BinaryInteger>(_ rc: T, _ operation: @autoclosure () -> String, entry: String? = nil) throws(ArchiveError) -> T {
        if rc >= 0 || rc == T(ARCHIVE_WARN) { return rc }
        throw error(operation(), entry: entry)
    }
}

/// Reads an archive entry by entry. Not thread-safe: one reader per thread.
public final class ArchiveReader {
    public enum Mode: Sendable {
        /// tar in any of its dialects (ustar, pax, GNU), under any compression filter.
        case tar
        /// The decompressed bytes as one entry named "data" (for digests of the uncompressed tar).
        case raw
    }

    private let handle: ArchiveHandle
    /// Reused for every data read: one allocation per reader, not per entry.
    private let buffer: UnsafeMutableRawBufferPointer
    private var current: String?
    public var name: String { handle.name }

    /// Opens the archive at `path`.
    public convenience init(path: String, mode: Mode = .tar, chunkSize: Int = 1 << 20) throws(ArchiveError) {
        try self.init(name: path, mode: mode, chunkSize: chunkSize) { a in
            archive_read_open_filename(a, path, chunkSize)
        }
    }

    /// Reads from an open descriptor (which stays the caller's to close).
    public convenience init(fd: Int32, name: String? = nil, mode: Mode = .tar, chunkSize: Int = 1 << 20) throws(ArchiveError) {
        try self.init(name: name ?? "fd \(fd)", mode: mode, chunkSize: chunkSize) { a in
            archive_read_open_fd(a, fd, chunkSize)
        }
    }

    private init(name: String, mode: Mode, chunkSize: Int, open: (OpaquePointer) -> Int32) throws(ArchiveError) {
        guard let a = archive_read_new() else {
            throw ArchiveError(operation: "archive_read_new", archive: name, entry: nil, message: "out of memory")
        }
        handle = ArchiveHandle(a, name: name, free: { archive_read_free($0) })
        buffer = .allocate(byteCount: chunkSize, alignment: 16)
        try handle.check(archive_read_support_filter_all(a), "enabling decompression filters")
        switch mode {
        case .tar: try handle.check(archive_read_support_format_tar(a), "enabling the tar format")
        case .raw: try handle.check(archive_read_support_format_raw(a), "enabling the raw format")
        }
        try handle.check(open(a), "opening the archive")
    }

    deinit { buffer.deallocate() }

    /// The next entry's header, or nil at the end of the archive. Data not read is skipped.
    public func next() throws(ArchiveError) -> ArchiveEntry? {
        try ArchiveLocale.with(ArchiveLocale.c) { () throws(ArchiveError) in try nextHeader() }
    }

    private func nextHeader() throws(ArchiveError) -> ArchiveEntry? {
        var e: OpaquePointer?
        let rc = try handle.check(archive_read_next_header(handle.pointer, &e), "reading the header after entry",
                                  entry: current ?? "(start)")
        if rc == ARCHIVE_EOF { return nil }
        guard let e else { throw handle.error("reading a header", entry: current, fallback: "no entry") }
        let entry = Self.entry(e)
        current = entry.path
        return entry
    }

    /// Calls `body` with successive chunks of the current entry's data (zeros filled in for sparse holes).
    /// A chunk is only valid during the call.
    public func readData(_ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        while true {
            let n = try handle.check(archive_read_data(handle.pointer, buffer.baseAddress, buffer.count),
                                     "reading data", entry: current)
            if n == 0 { return }
            try body(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
        }
    }

    /// The current entry's data as an array (for small entries: manifests, configs).
    public func readAll(limit: Int = 64 << 20) throws -> [UInt8] {
        var bytes: [UInt8] = []
        try readData { chunk in
            guard bytes.count + chunk.count <= limit else {
                throw ArchiveError(operation: "reading data", archive: name, entry: current, message: "larger than \(limit) bytes")
            }
            bytes.append(contentsOf: chunk)
        }
        return bytes
    }

    private static func string(_ p: UnsafePointer<CChar>?) -> String? { p.map { String(cString: $0) } }

    /// An xattr name as libarchive's pax writer puts it in a header key (`url_encode` in
    /// archive_write_set_format_pax.c): every byte outside '!'...'~', and '%' and '=', as %XX.
    static func percentEncoded(_ name: String) -> String {
        let digits = Array("0123456789ABCDEF".unicodeScalars)
        var out = String.UnicodeScalarView()
        for byte in name.utf8 {
            if byte < 33 || byte > 126 || byte == UInt8(ascii: "%") || byte == UInt8(ascii: "=") {
                out.append(contentsOf: ["%", digits[Int(byte >> 4)], digits[Int(byte & 0xf)]])
            } else {
                out.append(Unicode.Scalar(byte))
            }
        }
        return String(out)
    }

    private static func entry(_ e: OpaquePointer) -> ArchiveEntry {
        // The archive's bytes (see ArchiveLocale: in the C locale the UTF-8 form exists only for ASCII names
        // and the multibyte form holds the bytes as stored), decoded leniently.
        let path = string(archive_entry_pathname_utf8(e)) ?? string(archive_entry_pathname(e)) ?? ""
        let hardlink = string(archive_entry_hardlink_utf8(e)) ?? string(archive_entry_hardlink(e))
        let symlink = string(archive_entry_symlink_utf8(e)) ?? string(archive_entry_symlink(e))
        let type = UInt32(archive_entry_filetype(e))
        let kind: ArchiveEntry.Kind
        if hardlink != nil {
            kind = .hardlink
        } else {
            switch type {
            case ArchiveFileType.directory: kind = .directory
            case ArchiveFileType.symlink: kind = .symlink
            case ArchiveFileType.character: kind = .characterDevice
            case ArchiveFileType.block: kind = .blockDevice
            case ArchiveFileType.fifo: kind = .fifo
            case ArchiveFileType.socket: kind = .socket
            default: kind = .regular
            }
        }
        var xattrs: [ArchiveEntry.Xattr] = []
        if archive_entry_xattr_reset(e) > 0 {
            var name: UnsafePointer<CChar>?
            var value: UnsafeRawPointer?
            var size = 0
            while archive_entry_xattr_next(e, &name, &value, &size) == ARCHIVE_OK {
                guard let name else { continue }
                let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
                let key = String(cString: name)
                // libarchive's own pax writer records each xattr twice (LIBARCHIVE.xattr and SCHILY.xattr),
                // and its reader returns both: one name, one value. (Compared as bytes: see ByteName.)
                if let i = xattrs.firstIndex(where: { $0.name.utf8.elementsEqual(key.utf8) }) {
                    xattrs[i].value = bytes
                } else {
                    xattrs.append(.init(name: key, value: bytes))
                }
            }
        }
        // The two records carry the name differently when it has a byte outside '!'...'~', '%' or '=': the
        // writer percent-encodes it in both keys, and the reader decodes only the LIBARCHIVE one. The SCHILY
        // twin then reads as a second xattr named "user.caf%C3%A9" beside "user.café", with the same value.
        let read = xattrs
        xattrs.removeAll { x in
            read.contains { other in
                other.value == x.value && !other.name.utf8.elementsEqual(x.name.utf8)
                    && Self.percentEncoded(other.name).utf8.elementsEqual(x.name.utf8)
            }
        }
        let mtime = archive_entry_mtime_is_set(e) != 0
            ? Timestamp(seconds: Int64(archive_entry_mtime(e)), nanoseconds: UInt32(clamping: archive_entry_mtime_nsec(e)))
            : Timestamp(seconds: 0, nanoseconds: 0)
        return ArchiveEntry(
            path: path, kind: kind, permissions: UInt32(archive_entry_perm(e)) & 0o7777,
            uid: UInt32(truncatingIfNeeded: archive_entry_uid(e)), gid: UInt32(truncatingIfNeeded: archive_entry_gid(e)),
            mtime: mtime, size: archive_entry_size_is_set(e) != 0 ? UInt64(max(0, archive_entry_size(e))) : 0,
            symlinkTarget: kind == .symlink ? (symlink ?? "") : nil, hardlinkTarget: hardlink,
            deviceMajor: UInt32(truncatingIfNeeded: archive_entry_rdevmajor(e)),
            deviceMinor: UInt32(truncatingIfNeeded: archive_entry_rdevminor(e)), xattrs: xattrs)
    }
}

/// Writes a PAX tar to a descriptor (which stays the caller's to close).
public final class ArchiveWriter {
    private let handle: ArchiveHandle
    private var current: String?
    private var finished = false

    public init(fd: Int32, name: String? = nil) throws(ArchiveError) {
        let label = name ?? "fd \(fd)"
        guard let a = archive_write_new() else {
            throw ArchiveError(operation: "archive_write_new", archive: label, entry: nil, message: "out of memory")
        }
        handle = ArchiveHandle(a, name: label, free: { archive_write_free($0) })
        // Full PAX ("interchange"), not "restricted": every non-zero nanosecond mtime gets its record.
        try handle.check(archive_write_set_format_pax(a), "selecting the pax format")
        try handle.check(archive_write_open_fd(a, fd), "opening the archive for writing")
    }

    /// Writes a header; for a regular file, `entry.size` bytes of `writeData` must follow.
    public func writeHeader(_ entry: ArchiveEntry) throws(ArchiveError) {
        try ArchiveLocale.with(ArchiveLocale.utf8) { () throws(ArchiveError) in try header(entry) }
    }

    private func header(_ entry: ArchiveEntry) throws(ArchiveError) {
        guard let e = archive_entry_new() else {
            throw ArchiveError(operation: "archive_entry_new", archive: handle.name, entry: entry.path, message: "out of memory")
        }
        defer { archive_entry_free(e) }
        current = entry.path
        // The multibyte form, copied as it is: see ArchiveLocale for why not the _utf8 setters.
        archive_entry_copy_pathname(e, entry.path)
        let type: UInt32
        switch entry.kind {
        case .regular, .hardlink: type = ArchiveFileType.regular
        case .directory: type = ArchiveFileType.directory
        case .symlink: type = ArchiveFileType.symlink
        case .characterDevice: type = ArchiveFileType.character
        case .blockDevice: type = ArchiveFileType.block
        case .fifo: type = ArchiveFileType.fifo
        case .socket: type = ArchiveFileType.socket
        }
        archive_entry_set_filetype(e, type)
        archive_entry_set_perm(e, mode_t(entry.permissions & 0o7777))
        archive_entry_set_uid(e, la_int64_t(entry.uid))
        archive_entry_set_gid(e, la_int64_t(entry.gid))
        archive_entry_set_mtime(e, time_t(entry.mtime.seconds), Int(entry.mtime.nanoseconds))
        if entry.kind == .hardlink {
            archive_entry_copy_hardlink(e, entry.hardlinkTarget ?? "")
            archive_entry_set_size(e, 0)
        } else {
            archive_entry_set_size(e, entry.kind == .regular ? la_int64_t(entry.size) : 0)
        }
        if entry.kind == .symlink { archive_entry_copy_symlink(e, entry.symlinkTarget ?? "") }
        if entry.kind == .characterDevice || entry.kind == .blockDevice {
            archive_entry_set_rdevmajor(e, dev_t(entry.deviceMajor))
            archive_entry_set_rdevminor(e, dev_t(entry.deviceMinor))
        }
        for x in entry.xattrs {
            x.value.withUnsafeBytes { archive_entry_xattr_add_entry(e, x.name, $0.baseAddress, $0.count) }
        }
        try handle.check(archive_write_header(handle.pointer, e), "writing the header", entry: entry.path)
    }

    /// Appends data to the current regular-file entry.
    public func writeData(_ bytes: UnsafeRawBufferPointer) throws(ArchiveError) {
        var done = 0
        while done < bytes.count {
            let n = try handle.check(archive_write_data(handle.pointer, bytes.baseAddress! + done, bytes.count - done),
                                     "writing data", entry: current)
            guard n > 0 else { throw handle.error("writing data", entry: current, fallback: "no progress") }
            done += n
        }
    }

    /// Writes the end-of-archive blocks. The archive is unusable afterwards.
    public func finish() throws(ArchiveError) {
        guard !finished else { return }
        finished = true
        try handle.check(archive_write_close(handle.pointer), "closing the archive", entry: current)
    }
}
