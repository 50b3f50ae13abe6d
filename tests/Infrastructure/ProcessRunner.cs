using System.Diagnostics;

namespace OffloadRpc.Tests.Infrastructure;

/// <summary>Runs a tool (dotnet publish/pack, a published binary) to completion with a time bound.</summary>
internal static class ProcessRunner
{
    public static async Task<(int ExitCode, string Output)> RunAsync(string file, string[] arguments, TimeSpan timeout, string? workingDirectory = null)
    {
        var info = new ProcessStartInfo(file, arguments) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = workingDirectory ?? string.Empty };
        // A build started from inside `dotnet test` must not inherit the outer MSBuild's node settings.
        foreach (string key in info.Environment.Keys.Where(k => k.StartsWith("MSBUILD", StringComparison.OrdinalIgnoreCase) || k.StartsWith("VSTEST", StringComparison.OrdinalIgnoreCase)).ToArray())
        {
            info.Environment.Remove(key);
        }

        using Process process = Process.Start(info)!;
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            // The pipes close with the process tree; a descendant that escaped the kill and kept them open
            // must not hang the test, so its output is waited for a few seconds at most.
            await Task.WhenAny(Task.WhenAll(stdout, stderr), Task.Delay(TimeSpan.FromSeconds(5)));
            string printed = (stdout.IsCompletedSuccessfully ? stdout.Result : "(stdout still open)") + (stderr.IsCompletedSuccessfully ? stderr.Result : "(stderr still open)");
            throw new TimeoutException($"{file} {string.Join(' ', arguments)} did not finish within {timeout}. It printed:\n{printed}");
        }

        return (process.ExitCode, await stdout + await stderr);
    }
}
