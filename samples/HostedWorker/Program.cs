using System.Diagnostics;
using HostedWorker;

// dotnet run --project samples/HostedWorker                  both processes: starts the server, runs the client, stops the server
// dotnet run --project samples/HostedWorker -- server [ep]   the server alone (Ctrl+C stops it)
// dotnet run --project samples/HostedWorker -- client [ep]   the client alone
string mode = args.Length > 0 ? args[0] : "demo";
string endpoint = args.Length > 1 ? args[1] : "hosted-worker";
switch (mode)
{
    case "server":
        await Server.RunAsync(endpoint);
        return 0;
    case "client":
        await Client.RunAsync(endpoint);
        return 0;
    case "demo":
        return await DemoAsync(endpoint);
    default:
        Console.Error.WriteLine("usage: HostedWorker [server|client|demo] [endpoint]");
        return 2;
}

// The server in a second process (its output prefixed with [server]), the client in this one.
static async Task<int> DemoAsync(string endpoint)
{
    string self = typeof(Server).Assembly.Location;
    string host = Environment.ProcessPath!;
    var start = new ProcessStartInfo(host) { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false };
    if (Path.GetFileNameWithoutExtension(host) == "dotnet")
    {
        start.ArgumentList.Add("exec");
        start.ArgumentList.Add(self);
    }

    start.ArgumentList.Add("server");
    start.ArgumentList.Add(endpoint);
    using Process server = Process.Start(start)!;
    var started = new TaskCompletionSource();
    server.OutputDataReceived += (_, e) =>
    {
        if (e.Data is null)
        {
            return;
        }

        Console.WriteLine("[server] " + e.Data);
        if (e.Data.Contains("Application started", StringComparison.Ordinal))
        {
            started.TrySetResult();
        }
    };
    server.BeginOutputReadLine();
    await started.Task.WaitAsync(TimeSpan.FromSeconds(60));

    await Client.RunAsync(endpoint);

    server.StandardInput.Close(); // the server stops gracefully
    await server.WaitForExitAsync();
    return 0;
}
