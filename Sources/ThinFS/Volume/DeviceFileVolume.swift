import Foundation
import SystemPackage

/// A `BlockDevice` as one regular file, `/device`, in a directory of its own, so that the FUSE
/// server can hand a thin device to a tool that wants a file, with no kernel block device:
/// `resize2fs` and `e2fsck` (e2fsprogs' own programs, which libext2fs does not offer as calls)
/// work on an image file as well as on a disk.
///
///     MOUNTPOINT/            inode 1, mode 0700
///     MOUNTPOINT/device      inode 2, mode 0600, size = the device's size; read, write, fsync
///
/// Everything else (creating, removing, renaming, xattrs) is refused with the errno a
/// read-only or unsupporting filesystem returns.
public final class DeviceFileVolume: FileSystemVolume, @unchecked Sendable {
    public static let fileName = "device"
    public let device: BlockDevice
    public let isReadOnly: Bool
    public var rootInode: UInt64 { 1 }
    static let fileInode: UInt64 = 2
    private let created = Volume.now()

    public init(device: BlockDevice, readOnly: Bool = false) {
        self.device = device
        self.isReadOnly = readOnly
    }

    private func attributes(_ ino: UInt64) throws(VolumeError) -> FileAttributes {
        switch ino {
        case rootInode:
            return FileAttributes(ino: ino, mode: 0o040700, nlink: 2, uid: 0, gid: 0, rdev: 0, size: 4096, blocks: 8,
                                  atime: created, mtime: created, ctime: created, blockSize: 4096, generation: 0)
        case Self.fileInode:
            return FileAttributes(ino: ino, mode: 0o100600, nlink: 1, uid: 0, gid: 0, rdev: 0, size: device.size,
                                  blocks: device.size / 512, atime: created, mtime: created, ctime: created,
                                  blockSize: 4096, generation: 0)
        default:
            throw VolumeError(.noSuchFileOrDirectory, "inode \(ino) does not exist")
        }
    }

    private func refuse(_ op: String) -> VolumeError {
        VolumeError(isReadOnly ? .readOnlyFileSystem : .notPermitted, "\(op): the device directory holds only '\(Self.fileName)'")
    }

    public func lookup(parent: UInt64, name: String) throws(VolumeError) -> FileAttributes {
        guard parent == rootInode else { throw VolumeError(.notDirectory, "inode \(parent) is not a directory") }
        guard name == Self.fileName else { throw VolumeError(.noSuchFileOrDirectory, "\(name) does not exist") }
        return try attributes(Self.fileInode)
    }

    public func getattr(_ ino: UInt64) throws(VolumeError) -> FileAttributes { try attributes(ino) }

    public func setattr(_ ino: UInt64, _ changes: AttributeChanges) throws(VolumeError) -> FileAttributes {
        // Truncating to the device's own size (what tools that open with O_TRUNC-free rw do) is a no-op.
        if let size = changes.size, size != device.size {
            throw VolumeError(.notPermitted, "the device file is \(device.size) bytes; it cannot be resized")
        }
        return try attributes(ino)
    }

    public func readdir(_ ino: UInt64, after cookie: UInt64, _ body: (DirectoryEntry) throws(VolumeError) -> Bool) throws(VolumeError) {
        guard ino == rootInode else { throw VolumeError(.notDirectory, "inode \(ino) is not a directory") }
        let entries = [DirectoryEntry(name: ".", ino: rootInode, type: 0o040000, cookie: 1),
                       DirectoryEntry(name: "..", ino: rootInode, type: 0o040000, cookie: 2),
                       DirectoryEntry(name: Self.fileName, ino: Self.fileInode, type: 0o100000, cookie: 3)]
        for entry in entries where entry.cookie > cookie {
            guard try body(entry) else { return }
        }
    }

    public func mkdir(parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> FileAttributes { throw refuse("mkdir") }
    public func mknod(parent: UInt64, name: String, mode: UInt32, rdev: UInt64, owner: Owner) throws(VolumeError) -> FileAttributes { throw refuse("mknod") }
    public func symlink(parent: UInt64, name: String, target: String, owner: Owner) throws(VolumeError) -> FileAttributes { throw refuse("symlink") }
    public func readlink(_ ino: UInt64) throws(VolumeError) -> String { throw VolumeError(.invalidArgument, "inode \(ino) is not a symlink") }
    public func link(_ ino: UInt64, newParent: UInt64, newName: String) throws(VolumeError) -> FileAttributes { throw refuse("link") }
    public func unlink(parent: UInt64, name: String) throws(VolumeError) { throw refuse("unlink") }
    public func rmdir(parent: UInt64, name: String) throws(VolumeError) { throw refuse("rmdir") }
    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: RenameFlags) throws(VolumeError) { throw refuse("rename") }

    public func read(_ ino: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        guard ino == Self.fileInode else { throw VolumeError(.isDirectory, "inode \(ino) is a directory") }
        guard offset < device.size else { return 0 }
        let n = Int(min(UInt64(buffer.count), device.size - offset))
        do { try device.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset) } catch {
            throw VolumeError(.ioError, "reading the device at \(offset): \(error)")
        }
        return n
    }

    public func write(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        guard !isReadOnly else { throw refuse("write") }
        guard ino == Self.fileInode else { throw VolumeError(.isDirectory, "inode \(ino) is a directory") }
        guard offset <= device.size, UInt64(buffer.count) <= device.size - offset else {
            throw VolumeError(.noSpace, "a write at \(offset)+\(buffer.count) goes past the device's \(device.size) bytes")
        }
        do { try device.write(buffer, at: offset) } catch {
            throw VolumeError(Errno(reporting: error), "writing the device at \(offset): \(error)")
        }
        return buffer.count
    }

    public func fallocate(_ ino: UInt64, mode: FallocateMode, offset: UInt64, length: UInt64) throws(VolumeError) {
        throw VolumeError(.notSupported, "fallocate on the device file")
    }

    public func seek(_ ino: UInt64, from offset: UInt64, to whence: SeekTarget) throws(VolumeError) -> UInt64 {
        // All data: the thin device's holes are not exposed.
        guard offset < device.size else { throw VolumeError(.noSuchAddressOrDevice, "offset \(offset) is past the end") }
        return whence == .data ? offset : device.size
    }

    public func getxattr(_ ino: UInt64, name: String) throws(VolumeError) -> [UInt8] { throw VolumeError(.init(rawValue: ENODATA), "no xattr \(name)") }
    public func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: XattrFlags) throws(VolumeError) { throw VolumeError(.notSupported, "xattrs on the device file") }
    public func listxattr(_ ino: UInt64) throws(VolumeError) -> [String] { [] }
    public func removexattr(_ ino: UInt64, name: String) throws(VolumeError) { throw VolumeError(.init(rawValue: ENODATA), "no xattr \(name)") }

    public func statfs() throws(VolumeError) -> FileSystemStatistics {
        FileSystemStatistics(blockSize: 4096, blocks: device.size / 4096, freeBlocks: 0, availableBlocks: 0, files: 2, freeFiles: 0, nameMax: 255)
    }

    public func fsync(_ ino: UInt64?) throws(VolumeError) {
        guard !isReadOnly else { return }
        do { try device.flush() } catch { throw VolumeError(.ioError, "flushing the device: \(error)") }
    }

    /// Nothing here is ever unlinked: references need no counting.
    public func remember(_ ino: UInt64) {}
    public func forget(_ ino: UInt64) {}
    public func open(_ ino: UInt64) throws(VolumeError) { _ = try attributes(ino) }
    public func release(_ ino: UInt64) {}
}
