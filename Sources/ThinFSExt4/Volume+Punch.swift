internal import CExt2fs
import Foundation
import SystemPackage
import ThinFSCore

// Releasing a file's blocks: ext2fs_punch, and a way around its refusal of the last block.

extension Volume {
    /// `ext2fs_punch` of logical blocks `start...end` of inode `ino` (`end` ~0: to the end of
    /// the file), which it writes; `inode` is kept current.
    ///
    /// libext2fs 1.46.6 to 1.47.3 refuses to free a physical range that ends at the
    /// filesystem's last block (its `punch_extent_blocks` compares the range's end with `>=`
    /// where `>` is meant: e2fsprogs commit 509da989, fixed in 1.47.4). It refuses with
    /// EXT2_ET_BAD_BLOCK_NUM after taking the range out of the extent tree, so the blocks stay
    /// marked in the bitmap and counted in i_blocks, in no extent, and the rest of the punch is
    /// skipped: e2fsck then finds "block bitmap differences" and a wrong i_blocks. A file that
    /// ran the filesystem to its last block (any write that filled it) met that on unlink,
    /// truncate, and the release of a failed write's blocks. When the file holds that block
    /// in the range, the range is punched around it, and the block is unmapped
    /// (`ext2fs_bmap2` with BMAP_SET to 0) and freed here. On a fixed libext2fs this is the
    /// same punch in up to three parts.
    func punch(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, _ start: UInt64, _ end: UInt64) -> errcode_t {
        func plain(_ from: UInt64, _ to: UInt64) -> errcode_t {
            withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, from, to) }
            }
        }
        guard let logical = logicalBlockOfLastBlock(fs, ino, &inode, start, end) else { return plain(start, end) }
        let lastBlock = ext2fs_blocks_count(fs.pointee.super) - 1
        if logical < end {
            let rc = plain(logical + 1, end)
            if rc != 0 { return rc }
        }
        var unmapped: blk64_t = 0
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { i -> errcode_t in
                let rc = ext2fs_bmap2(fs, ext2_ino_t(ino), i, nil, Int32(BMAP_SET), logical, nil, &unmapped)
                guard rc == 0 else { return rc }
                ext2fs_block_alloc_stats2(fs, lastBlock, -1)
                let sub = ext2fs_iblk_sub_blocks(fs, i, 1)
                guard sub == 0 else { return sub }
                return ext2fs_write_inode(fs, ext2_ino_t(ino), i)
            }
        }
        if rc != 0 { return rc }
        return logical > start ? plain(start, logical - 1) : 0
    }

    /// The logical block in `start...end` of inode `ino` that maps the filesystem's last
    /// block, if the file has it there (written or unwritten); nil without a walk when that
    /// block is free, which it is but on a filesystem filled to its end.
    private func logicalBlockOfLastBlock(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large,
                                         _ start: UInt64, _ end: UInt64) -> UInt64? {
        let lastBlock = ext2fs_blocks_count(fs.pointee.super) - 1
        guard inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0, inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0,
              fs.pointee.cluster_ratio_bits == 0, start <= end,
              ext2fs_test_block_bitmap2(fs.pointee.block_map, blk64_t(lastBlock)) != 0 else { return nil }
        var handle: ext2_extent_handle_t?
        let opened = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ext2_ino_t(ino), $0, &handle) }
        }
        guard opened == 0 else { return nil }
        defer { ext2fs_extent_free(handle) }
        var extent = ext2fs_extent()
        var rc = ext2fs_extent_get(handle, EXT2_EXTENT_ROOT, &extent)
        while rc == 0 {
            if extent.e_flags & UInt32(EXT2_EXTENT_FLAGS_LEAF) != 0, extent.e_len > 0,
               extent.e_pblk <= lastBlock, lastBlock < extent.e_pblk + UInt64(extent.e_len) {
                let logical = extent.e_lblk + (lastBlock - extent.e_pblk)
                return start <= logical && logical <= end ? logical : nil
            }
            rc = ext2fs_extent_get(handle, EXT2_EXTENT_NEXT_LEAF, &extent)
        }
        return nil
    }
}
