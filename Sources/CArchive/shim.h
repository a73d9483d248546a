// CArchive: only defines and includes. Exactly one Swift file imports this module.
#pragma once
#include <archive.h>
#include <archive_entry.h>
