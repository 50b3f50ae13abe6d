using System.Runtime.InteropServices;

namespace OffloadRpc.Benchmarks;

internal static partial class Native
{
    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags);

    public const int O_RDWR = 2;
}
