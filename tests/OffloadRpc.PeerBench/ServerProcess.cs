using System.Diagnostics;
using System.Globalization;

namespace OffloadRpc.PeerBench;

/// <summary>A server of the benchmark: this program started again with <c>--serve KIND ENDPOINT</c>.</summary>
internal sealed class ServerProcess : IAsyncDisposable
{
    /// <summary>Set in every child's environment: a child never starts a benchmark of its own.</summary>
    public const string RoleVariable = "OFFLOADRPC_PEERBENCH_ROLE";

    private readonly Process _process;

    private ServerProcess(Process process, string kind)
    {
        _process = process;
        Kind = kind;
    }

    public string Kind { get; }

    public int ProcessId => _process.Id;

    /// <summary>Completes when the server process exits.</summary>
    public Task Exited => _process.WaitForExitAsync();

    /// <summary>Passes <see cref="Settings.SpinBudget"/> to an OffloadRpc server (in microseconds).</summary>
    public const string SpinVariable = "OFFLOADRPC_PEERBENCH_SPIN_US";

    public static async Task<ServerProcess> StartAsync(string kind, string endpoint, TimeSpan? spinBudget = null)
    {
        var server = new ServerProcess(Start(["--serve", kind, endpoint], spinBudget), kind);
        try
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            while (await server._process.StandardOutput.ReadLineAsync(timeout.Token) is { } line)
            {
                if (line.StartsWith("READY", StringComparison.Ordinal))
                {
                    _ = server._process.StandardOutput.ReadToEndAsync(CancellationToken.None); // keep draining: a full pipe would block the server
                    return server;
                }
            }

            throw new InvalidOperationException($"The {kind} server exited before it was ready.");
        }
        catch (OperationCanceledException)
        {
            await server.DisposeAsync();
            throw new TimeoutException($"The {kind} server printed no READY line within 60 s.");
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    /// <summary>The ping-pong floor's partner process.</summary>
    public static Process StartPartner(int parentProcessId, int fd) =>
        Start(["--pingpong-partner", parentProcessId.ToString(CultureInfo.InvariantCulture), fd.ToString(CultureInfo.InvariantCulture)]);

    private static Process Start(IEnumerable<string> arguments, TimeSpan? spinBudget = null) =>
        Process.Start(StartInfo(arguments, spinBudget)) ?? throw new InvalidOperationException($"Could not start {Environment.ProcessPath}.");

    /// <summary>This program started again as a child (a server, the ping-pong partner, a client process of <c>--clients</c>).</summary>
    public static ProcessStartInfo StartInfo(IEnumerable<string> arguments, TimeSpan? spinBudget = null)
    {
        string processPath = Environment.ProcessPath ?? throw new InvalidOperationException("The path of this process's executable is unknown.");
        var start = new ProcessStartInfo(processPath)
        {
            UseShellExecute = false,
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
        };
        if (Path.GetFileNameWithoutExtension(processPath).Equals("dotnet", StringComparison.OrdinalIgnoreCase))
        {
            start.ArgumentList.Add(typeof(ServerProcess).Assembly.Location);
        }

        foreach (string argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }

        start.Environment[RoleVariable] = "child";
        if (spinBudget is { } spin)
        {
            start.Environment[SpinVariable] = spin.TotalMicroseconds.ToString(CultureInfo.InvariantCulture);
        }

        return start;
    }

    /// <summary>Kills the server at once (the run is being abandoned).</summary>
    public void Kill()
    {
        try
        {
            _process.Kill(); // a server starts no processes of its own
        }
        catch (Exception ex) when (ex is InvalidOperationException or System.ComponentModel.Win32Exception or NotSupportedException)
        {
            // already gone
        }
    }

    /// <summary>Closes the server's stdin (its signal to stop) and waits; kills it after 10 s.</summary>
    public async ValueTask DisposeAsync()
    {
        try
        {
            try
            {
                _process.StandardInput.Close();
            }
            catch (IOException)
            {
                // already gone
            }

            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            try
            {
                await _process.WaitForExitAsync(timeout.Token);
            }
            catch (OperationCanceledException)
            {
                Console.Error.WriteLine($"The {Kind} server {_process.Id} did not exit within 10 s of its stdin closing; killing it.");
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync(CancellationToken.None);
            }
        }
        finally
        {
            _process.Dispose();
        }
    }
}
