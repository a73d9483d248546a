// CExt2fs: only defines and includes. Exactly one Swift file imports this module.
#pragma once
#include <ext2fs/ext2fs.h>
#include <et/com_err.h>
