using System.Runtime.InteropServices;
using System.Text;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// Maps an endpoint to a Unix socket path. A bare name ("imagesvc") lives in the per-user
/// directory — $XDG_RUNTIME_DIR/offloadrpc when that is set, else /tmp/offloadrpc-{uid} — which is
/// created with mode 0700 and checked to be ours and not a symbolic link before it is used.
/// Anything with a '/' is taken as a socket path as it is.
/// </summary>
internal static partial class EndpointPath
{
    /// <summary>sun_path holds 108 bytes including the terminating NUL.</summary>
    public const int MaxPathBytes = 107;

    public static string Resolve(string endpoint)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        string path;
        if (endpoint.Contains('/', StringComparison.Ordinal))
        {
            path = Path.GetFullPath(endpoint);
        }
        else
        {
            foreach (char c in endpoint)
            {
                if (!(char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.') || endpoint.Length > 64 || endpoint[0] == '.')
                {
                    throw new ArgumentException($"Endpoint name '{endpoint}' must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'; pass a path (with a '/') for anything else.", nameof(endpoint));
                }
            }

            path = Path.Combine(UserDirectory(), endpoint + ".sock");
        }

        if (Encoding.UTF8.GetByteCount(path) > MaxPathBytes)
        {
            throw new ArgumentException($"Socket path '{path}' is longer than the {MaxPathBytes} bytes a Unix socket address holds.", nameof(endpoint));
        }

        return path;
    }

    /// <summary>The per-user socket directory, created (0700) and verified.</summary>
    public static string UserDirectory()
    {
        if (!OperatingSystem.IsLinux())
        {
            throw new PlatformNotSupportedException("OffloadRpc runs on Linux only (memfd, futex, SCM_RIGHTS).");
        }

        uint uid = LinuxNative.GetEuid();
        string? runtimeDirectory = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
        string directory = !string.IsNullOrEmpty(runtimeDirectory) && Directory.Exists(runtimeDirectory)
            ? Path.Combine(runtimeDirectory, "offloadrpc")
            : Path.Combine(Path.GetTempPath(), $"offloadrpc-{uid}");

        if (!Directory.Exists(directory))
        {
            try
            {
                Directory.CreateDirectory(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            }
            catch (IOException) when (Directory.Exists(directory))
            {
                // Created concurrently by another process; verified below.
            }
        }

        Verify(directory, uid);
        return directory;
    }

    [System.Runtime.Versioning.SupportedOSPlatform("linux")]
    private static unsafe void Verify(string directory, uint uid)
    {
        // struct stat, read through lstat so that a link is seen as a link; its offsets are per architecture (LinuxAbi).
        byte* stat = stackalloc byte[256];
        if (Lstat(directory, stat) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new OffloadRpcException($"Cannot inspect the socket directory {directory}: {Marshal.GetPInvokeErrorMessage(errno)}.");
        }

        Interop.LinuxAbi abi = Interop.LinuxAbi.Current;
        int modeOffset = abi.StatModeOffset;
        int uidOffset = abi.StatUidOffset;
        uint mode = *(uint*)(stat + modeOffset);
        uint owner = *(uint*)(stat + uidOffset);
        const uint S_IFMT = 0xF000;
        const uint S_IFDIR = 0x4000;
        if ((mode & S_IFMT) != S_IFDIR)
        {
            throw new OffloadRpcException($"The socket directory {directory} is not a directory (a link or file is in its place); refusing to use it.");
        }

        if (owner != uid)
        {
            throw new OffloadRpcException($"The socket directory {directory} belongs to uid {owner}, not to this user ({uid}); refusing to use it.");
        }

        if ((mode & 0x1FF) != 0x1C0)
        {
            File.SetUnixFileMode(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }

    /// <summary>What is at <paramref name="path"/> itself (a link is a link): null when nothing is, else "socket", "regular file", "directory", "symbolic link", ...</summary>
    public static unsafe string? KindOf(string path)
    {
        byte* stat = stackalloc byte[256];
        if (Lstat(path, stat) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            return errno == 2 /* ENOENT */ ? null : throw new OffloadRpcException($"Cannot inspect {path}: {Marshal.GetPInvokeErrorMessage(errno)}.");
        }

        uint mode = *(uint*)(stat + Interop.LinuxAbi.Current.StatModeOffset);
        return (mode & 0xF000) switch
        {
            0xC000 => "socket",
            0x8000 => "regular file",
            0x4000 => "directory",
            0xA000 => "symbolic link",
            0x1000 => "named pipe",
            0x2000 => "character device",
            0x6000 => "block device",
            _ => "file of unknown type",
        };
    }

    [LibraryImport("libc", EntryPoint = "lstat", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial int Lstat(string path, byte* buffer);
}
