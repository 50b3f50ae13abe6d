using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using System.Diagnostics;
using OffloadRpc;

namespace ImagePipeline;

/// <summary>
/// The worker role: this same program started again by the client, with <c>--worker ENDPOINT</c> and
/// <see cref="RoleVariable"/> set. It serves <see cref="IImageWorker"/>, prints one READY line on
/// stdout, and serves until its stdin closes (the client closes it, or dies).
/// </summary>
internal sealed class WorkerProcess : IAsyncDisposable
{
    /// <summary>Set in the worker's environment: a process that has it never starts another worker.</summary>
    public const string RoleVariable = "IMAGEPIPELINE_ROLE";

    public const string WorkerArgument = "--worker";

    /// <summary>Given to the worker too: serve over gRPC on 127.0.0.1 as well as over shared memory.</summary>
    public const string GrpcArgument = "--grpc";

    private readonly Process _process;

    private WorkerProcess(Process process) => _process = process;

    public int ProcessId => _process.Id;

    /// <summary>Serves until stdin closes. The body of the worker process.</summary>
    public static async Task<int> ServeAsync(string endpoint, bool grpc = false)
    {
        if (grpc)
        {
            return await ServeBothWaysAsync(endpoint);
        }

        await using var server = new OffloadRpcServer(endpoint);
        server.Register<IImageWorker>(new ImageWorker());
        server.ConnectionFailed += ex => Console.Error.WriteLine($"worker: a client failed: {ex.GetType().Name}: {ex.Message}");
        await server.StartAsync();
        Console.WriteLine($"READY {server.SocketPath}");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    /// <summary>
    /// The worker as an ASP.NET Core app: <see cref="IImageWorker"/> over shared memory (a hosted server on
    /// <paramref name="endpoint"/>) and over gRPC (h2c on 127.0.0.1, a port the system picks).
    /// </summary>
    private static async Task<int> ServeBothWaysAsync(string endpoint)
    {
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(kestrel => kestrel.Listen(System.Net.IPAddress.Loopback, 0, listen => listen.Protocols = HttpProtocols.Http2));
        builder.Services.AddOffloadRpcServer(endpoint).AddService<IImageWorker, ImageWorker>(ServiceLifetime.Singleton);
        await using WebApplication app = builder.Build();
        app.MapOffloadRpcGrpc();
        await app.StartAsync();
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        Console.WriteLine($"READY {endpoint} {address}");
        await Task.Run(() => Console.In.ReadToEnd());
        await app.StopAsync();
        return 0;
    }

    /// <summary>Starts this program again in the worker role (same executable; through dotnet, with the assembly first).</summary>
    public static WorkerProcess Start(string endpoint, bool grpc = false)
    {
        string processPath = Environment.ProcessPath ?? throw new InvalidOperationException("The path of this process's executable is unknown.");
        var start = new ProcessStartInfo(processPath)
        {
            UseShellExecute = false,
            RedirectStandardInput = true,
            RedirectStandardOutput = true, // the READY line; stderr stays the terminal's
        };
        if (Path.GetFileNameWithoutExtension(processPath).Equals("dotnet", StringComparison.OrdinalIgnoreCase))
        {
            start.ArgumentList.Add(typeof(Program).Assembly.Location);
        }

        start.ArgumentList.Add(WorkerArgument);
        start.ArgumentList.Add(endpoint);
        if (grpc)
        {
            start.ArgumentList.Add(GrpcArgument);
        }
        start.Environment[RoleVariable] = "worker";
        Process process = Process.Start(start) ?? throw new InvalidOperationException($"Could not start the worker process {processPath}.");
        return new WorkerProcess(process);
    }

    /// <summary>Waits for the worker's READY line; fails if it exits first or takes longer than <paramref name="timeout"/>.</summary>
    /// <returns>The worker's gRPC address when it serves gRPC too, otherwise null.</returns>
    public async Task<string?> WaitReadyAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            while (await _process.StandardOutput.ReadLineAsync(cts.Token) is { } line)
            {
                if (line.StartsWith("READY", StringComparison.Ordinal))
                {
                    string[] words = line.Split(' ');
                    return words.Length > 2 ? words[2] : null;
                }
            }
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            throw new TimeoutException($"The worker process {_process.Id} printed no READY line within {timeout.TotalSeconds:0} s.");
        }

        await _process.WaitForExitAsync(CancellationToken.None);
        throw new InvalidOperationException($"The worker process exited with code {_process.ExitCode} before it was ready.");
    }

    /// <summary>Closes the worker's stdin (its signal to stop) and waits for it; kills it if it does not exit.</summary>
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
                // the worker is already gone: its exit code says why
            }

            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            try
            {
                await _process.WaitForExitAsync(cts.Token);
                if (_process.ExitCode != 0)
                {
                    Console.Error.WriteLine($"The worker process exited with code {_process.ExitCode}.");
                }
            }
            catch (OperationCanceledException)
            {
                Console.Error.WriteLine($"The worker process {_process.Id} did not exit within 10 s of its stdin closing; killing it.");
                _process.Kill();
                await _process.WaitForExitAsync(CancellationToken.None);
            }
        }
        finally
        {
            _process.Dispose();
        }
    }
}
