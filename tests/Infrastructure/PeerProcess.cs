using System.Collections.Concurrent;
using System.Diagnostics;

namespace OffloadRpc.Tests.Infrastructure;

/// <summary>A second, real process running OffloadRpc.TestPeer; its standard output is read line by line.</summary>
internal sealed class PeerProcess : IAsyncDisposable
{
    private static readonly Lazy<string> s_peerDirectory = new(LocatePeer);
    private readonly Process _process;
    private readonly BlockingCollection<string> _lines = new();
    private readonly List<string> _allLines = new();

    private PeerProcess(Process process)
    {
        _process = process;
        _process.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null)
            {
                _lines.CompleteAdding();
                return;
            }

            lock (_allLines)
            {
                _allLines.Add(e.Data);
            }

            _lines.Add(e.Data);
        };
        _process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (_allLines)
                {
                    _allLines.Add("stderr: " + e.Data);
                }
            }
        };
    }

    public int Id => _process.Id;

    public bool HasExited => _process.HasExited;

    public string Output
    {
        get
        {
            lock (_allLines)
            {
                return string.Join(Environment.NewLine, _allLines);
            }
        }
    }

    /// <summary>Starts the peer; with <paramref name="asUser"/> it runs under that uid/gid through setpriv, from a copy readable by everyone.</summary>
    public static PeerProcess Start(IEnumerable<string> arguments, uint? asUser = null)
    {
        string dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";
        string peerDll = Path.Combine(s_peerDirectory.Value, "OffloadRpc.TestPeer.dll");
        var info = new ProcessStartInfo
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        if (asUser is { } uid)
        {
            info.FileName = "setpriv";
            foreach (string a in new[] { "--reuid", uid.ToString(), "--regid", uid.ToString(), "--clear-groups", dotnet, "exec", WorldReadableCopy(), })
            {
                info.ArgumentList.Add(a);
            }

            info.Environment["HOME"] = Path.GetTempPath();
            info.Environment["DOTNET_CLI_HOME"] = Path.GetTempPath();
            info.Environment.Remove("XDG_RUNTIME_DIR");
        }
        else
        {
            info.FileName = dotnet;
            info.ArgumentList.Add("exec");
            info.ArgumentList.Add(peerDll);
        }

        info.Environment["DOTNET_gcServer"] = "0";
        foreach (string argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }

        var process = new Process { StartInfo = info };
        var peer = new PeerProcess(process);
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return peer;
    }

    /// <summary>Waits for a line starting with <paramref name="prefix"/>; fails with the peer's output when it does not come.</summary>
    public string WaitForLine(string prefix, TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        try
        {
            foreach (string line in _lines.GetConsumingEnumerable(cts.Token))
            {
                if (line.StartsWith(prefix, StringComparison.Ordinal))
                {
                    return line;
                }
            }
        }
        catch (OperationCanceledException)
        {
        }

        throw new Xunit.Sdk.XunitException($"The peer (pid {_process.Id}) did not print '{prefix}'. Its output:{Environment.NewLine}{Output}");
    }

    public void Kill() => _process.Kill(entireProcessTree: true);

    /// <summary>Closes the peer's standard input: servers stop when it closes.</summary>
    public void CloseInput() => _process.StandardInput.Close();

    public async Task<int> WaitForExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        await _process.WaitForExitAsync(cts.Token);
        return _process.ExitCode;
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                try
                {
                    _process.StandardInput.Close(); // servers exit when their input closes
                }
                catch (IOException)
                {
                }
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                try
                {
                    await _process.WaitForExitAsync(cts.Token);
                }
                catch (OperationCanceledException)
                {
                    _process.Kill(entireProcessTree: true);
                    await _process.WaitForExitAsync();
                }
            }
        }
        catch (InvalidOperationException)
        {
        }

        _process.Dispose();
    }

    private static string LocatePeer()
    {
        // tests/OffloadRpc.Tests/bin/<Configuration>/net10.0/ -> tests/OffloadRpc.TestPeer/bin/<Configuration>/net10.0/
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string framework = Path.GetFileName(here);
        string configuration = Path.GetFileName(Path.GetDirectoryName(here)!);
        string tests = Path.GetFullPath(Path.Combine(here, "..", "..", "..", ".."));
        string peer = Path.Combine(tests, "OffloadRpc.TestPeer", "bin", configuration, framework);
        if (!File.Exists(Path.Combine(peer, "OffloadRpc.TestPeer.dll")))
        {
            throw new FileNotFoundException($"OffloadRpc.TestPeer is not built at {peer}; build the solution first.");
        }

        return peer;
    }

    private static readonly Lazy<string> s_worldReadable = new(() =>
    {
        // A process under another uid may not be able to reach the build folder: give it a copy it can read.
        string directory = Path.Combine(Path.GetTempPath(), $"offloadrpc-peer-{Environment.ProcessId}");
        Directory.CreateDirectory(directory);
        foreach (string file in Directory.GetFiles(s_peerDirectory.Value))
        {
            string target = Path.Combine(directory, Path.GetFileName(file));
            File.Copy(file, target, overwrite: true);
            File.SetUnixFileMode(target, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        }

        File.SetUnixFileMode(directory, (UnixFileMode)0b111_101_101);
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            try
            {
                Directory.Delete(directory, recursive: true);
            }
            catch (IOException)
            {
            }
        };
        return Path.Combine(directory, "OffloadRpc.TestPeer.dll");
    });

    private static string WorldReadableCopy() => s_worldReadable.Value;
}
