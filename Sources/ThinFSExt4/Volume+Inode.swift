internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// Inode encoding: sizes, times, owners, modes and device numbers, read from and written to
// libext2fs's `ext2_inode_large`.

extension Volume {
    // MARK: Inodes

    /// An inode's size in bytes (i_size with its high 32 bits).
    func fileSize(_ inode: ext2_inode_large) -> UInt64 { UInt64(inode.i_size) | UInt64(inode.i_size_high) << 32 }

    func readInode(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> ext2_inode_large {
        guard ino >= 1, ino <= UInt64(fs.pointee.super.pointee.s_inodes_count) else {
            throw VolumeError(.invalidArgument, "inode \(ino) is out of range")
        }
        var inode = ext2_inode_large()
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_read_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rc, "reading inode \(ino)")
        guard inode.i_links_count > 0 || openCounts[ino] != nil || orphans.contains(ino) else {
            throw VolumeError(.noSuchFileOrDirectory, "inode \(ino) is not in use")
        }
        return inode
    }

    func writeInode(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large) throws(VolumeError) {
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_write_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rc, "writing inode \(ino)")
    }

    /// ext4 timestamps: 32 signed bits of seconds, and an "extra" word holding
    /// nanoseconds << 2 and two epoch bits that extend the seconds past 2038
    /// (Documentation/filesystems/ext4/inodes.rst, "Inode Timestamps").
    static func decodeTime(_ seconds: UInt32, _ extra: UInt32, hasExtra: Bool) -> Timestamp {
        var s = Int64(Int32(bitPattern: seconds))
        guard hasExtra else { return Timestamp(seconds: s, nanoseconds: 0) }
        s += Int64(extra & 3) << 32
        return Timestamp(seconds: s, nanoseconds: extra >> 2)
    }

    static func encodeTime(_ t: Timestamp) -> (UInt32, UInt32) {
        let low = UInt32(truncatingIfNeeded: t.seconds)
        let epoch = UInt32(truncatingIfNeeded: (t.seconds - Int64(Int32(bitPattern: low))) >> 32) & 3
        return (low, (min(t.nanoseconds, 999_999_999) << 2) | epoch)
    }

    /// The last second kernel ext4 can store with the epoch bits (fs/ext4/ext4.h
    /// EXT4_EXTRA_TIMESTAMP_MAX): 2^34 seconds from -2^31.
    static let extraTimeMax = (Int64(1) << 34) - 1 + Int64(Int32.min)

    /// A time as ext4 keeps it. When a time is set, kernel ext4 clamps the seconds to what the inode can
    /// store, [-2^31, EXT4_EXTRA_TIMESTAMP_MAX] with the extra words (else 32 signed bits), and drops the
    /// nanoseconds at either bound (fs/inode.c timestamp_truncate, with ext4's s_time_min/s_time_max).
    /// Encoding an out-of-range time instead would wrap it: 2^34 would read back as 0.
    static func clampTime(_ t: Timestamp, hasExtra: Bool) -> Timestamp {
        let low = Int64(Int32.min), high = hasExtra ? extraTimeMax : Int64(Int32.max)
        let seconds = min(max(t.seconds, low), high)
        return Timestamp(seconds: seconds, nanoseconds: seconds == low || seconds == high ? 0 : t.nanoseconds)
    }

    package static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: UInt32(ts.tv_nsec))
    }

    static let extraSize = UInt16(MemoryLayout<ext2_inode_large>.size - Int(EXT2_GOOD_OLD_INODE_SIZE))

    func hasExtra(_ inode: ext2_inode_large) -> Bool { inode.i_extra_isize >= 24 }

    /// Every time written to an inode passes here, clamped to what that inode can store.
    func setTimes(_ inode: inout ext2_inode_large, atime: Timestamp? = nil, mtime: Timestamp? = nil,
                          ctime: Timestamp? = nil, crtime: Timestamp? = nil) {
        let extra = hasExtra(inode)
        func encode(_ t: Timestamp) -> (UInt32, UInt32) { Self.encodeTime(Self.clampTime(t, hasExtra: extra)) }
        if let t = atime { (inode.i_atime, inode.i_atime_extra) = encode(t) }
        if let t = mtime { (inode.i_mtime, inode.i_mtime_extra) = encode(t) }
        if let t = ctime { (inode.i_ctime, inode.i_ctime_extra) = encode(t) }
        if let t = crtime { (inode.i_crtime, inode.i_crtime_extra) = encode(t) }
    }

    func attributes(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large) -> FileAttributes {
        let extra = hasExtra(inode)
        let mode = UInt32(inode.i_mode)
        var rdev: UInt64 = 0
        if Self.isDevice(mode) {
            // Old encoding (major << 8 | minor) in i_block[0], else the new one in i_block[1] (fs/ext4/inode.c).
            let b0 = inode.i_block.0, b1 = inode.i_block.1
            if b0 != 0 {
                rdev = Self.makedev(major: (b0 >> 8) & 0xff, minor: b0 & 0xff)
            } else {
                rdev = Self.makedev(major: (b1 & 0xfff00) >> 8, minor: (b1 & 0xff) | ((b1 >> 12) & 0xfff00))
            }
        }
        let blocks = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_get_stat_i_blocks(fs, $0) }
        }
        return FileAttributes(
            ino: ino, mode: mode, nlink: UInt32(inode.i_links_count),
            uid: Self.uid(inode), gid: Self.gid(inode),
            rdev: rdev, size: fileSize(inode), blocks: UInt64(blocks),
            atime: Self.decodeTime(inode.i_atime, inode.i_atime_extra, hasExtra: extra),
            mtime: Self.decodeTime(inode.i_mtime, inode.i_mtime_extra, hasExtra: extra),
            ctime: Self.decodeTime(inode.i_ctime, inode.i_ctime_extra, hasExtra: extra),
            blockSize: UInt32(fs.pointee.blocksize), generation: inode.i_generation)
    }

    static func uid(_ inode: ext2_inode_large) -> UInt32 { UInt32(inode.i_uid) | UInt32(inode.osd2.linux2.l_i_uid_high) << 16 }
    static func gid(_ inode: ext2_inode_large) -> UInt32 { UInt32(inode.i_gid) | UInt32(inode.osd2.linux2.l_i_gid_high) << 16 }

    /// Splits 32-bit ids into ext4's low and high 16-bit fields.
    static func setOwner(_ inode: inout ext2_inode_large, uid: UInt32? = nil, gid: UInt32? = nil) {
        if let uid {
            inode.i_uid = UInt16(truncatingIfNeeded: uid)
            inode.osd2.linux2.l_i_uid_high = UInt16(truncatingIfNeeded: uid >> 16)
        }
        if let gid {
            inode.i_gid = UInt16(truncatingIfNeeded: gid)
            inode.osd2.linux2.l_i_gid_high = UInt16(truncatingIfNeeded: gid >> 16)
        }
    }

    /// The group of a new entry: a set-group-ID directory passes its own on (inode_init_owner).
    static func newGroup(_ parent: ext2_inode_large, _ owner: Owner) -> (gid: UInt32, setgidDirectory: Bool) {
        UInt32(parent.i_mode) & 0o2000 != 0 ? (gid(parent), true) : (owner.gid, false)
    }

    static func isDevice(_ mode: UInt32) -> Bool {
        let t = mode & 0o170000
        return t == 0o020000 || t == 0o060000
    }

    package static func makedev(major: UInt32, minor: UInt32) -> UInt64 {
        // glibc's encoding of dev_t.
        (UInt64(major & 0xfff) << 8) | (UInt64(major & ~0xfff) << 32) | UInt64(minor & 0xff) | (UInt64(minor & ~0xff) << 12)
    }

    package static func major(_ dev: UInt64) -> UInt32 { UInt32(((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)) }
    package static func minor(_ dev: UInt64) -> UInt32 { UInt32((dev & 0xff) | ((dev >> 12) & ~0xff)) }

    static func fileType(_ mode: UInt32) -> Int32 {
        switch mode & 0o170000 {
        case 0o100000: EXT2_FT_REG_FILE
        case 0o040000: EXT2_FT_DIR
        case 0o020000: EXT2_FT_CHRDEV
        case 0o060000: EXT2_FT_BLKDEV
        case 0o010000: EXT2_FT_FIFO
        case 0o140000: EXT2_FT_SOCK
        case 0o120000: EXT2_FT_SYMLINK
        default: EXT2_FT_UNKNOWN
        }
    }

    static func mode(fromFileType t: Int32) -> UInt32 {
        switch t {
        case EXT2_FT_REG_FILE: 0o100000
        case EXT2_FT_DIR: 0o040000
        case EXT2_FT_CHRDEV: 0o020000
        case EXT2_FT_BLKDEV: 0o060000
        case EXT2_FT_FIFO: 0o010000
        case EXT2_FT_SOCK: 0o140000
        case EXT2_FT_SYMLINK: 0o120000
        default: 0
        }
    }
}
