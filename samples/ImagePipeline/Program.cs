using OffloadRpc;
using Spectre.Console;

namespace ImagePipeline;

/// <summary>
/// A typed two-process image pipeline over OffloadRpc:
/// <code>dotnet run -c Release --project samples/ImagePipeline [-- --quick] [--grpc] [--json FILE]</code>
/// With no role argument this is the client: it starts itself again as the worker process, checks
/// every workload against a local reference, then times them. <c>--worker ENDPOINT</c> is the worker
/// role, started by the client only.
/// </summary>
internal static class Program
{
    public static async Task<int> Main(string[] args)
    {
        if (args.Length is 2 or 3 && args[0] == WorkerProcess.WorkerArgument)
        {
            if (Environment.GetEnvironmentVariable(WorkerProcess.RoleVariable) != "worker")
            {
                Console.Error.WriteLine($"{WorkerProcess.WorkerArgument} is the worker role that the client starts; run the program without it.");
                return 2;
            }

            return await WorkerProcess.ServeAsync(args[1], grpc: args.Length == 3 && args[2] == WorkerProcess.GrpcArgument);
        }

        if (Environment.GetEnvironmentVariable(WorkerProcess.RoleVariable) is not null)
        {
            // A worker must never become a client: that would start workers without end.
            Console.Error.WriteLine($"Started as a worker ({WorkerProcess.RoleVariable} is set) with unexpected arguments: {string.Join(' ', args)}");
            return 2;
        }

        bool quick = false;
        bool grpc = false;
        string? json = null;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--quick":
                    quick = true;
                    break;
                case "--grpc":
                    grpc = true; // the worker serves gRPC too: one table over gRPC, then one with the switch to shared memory
                    break;
                case "--json" when i + 1 < args.Length:
                    json = args[++i];
                    break;
                case "-h" or "--help":
                    Console.WriteLine("usage: ImagePipeline [--quick] [--grpc] [--json FILE]");
                    return 0;
                default:
                    Console.Error.WriteLine($"unknown argument '{args[i]}'; usage: ImagePipeline [--quick] [--grpc] [--json FILE]");
                    return 2;
            }
        }

        if (Console.IsOutputRedirected && AnsiConsole.Profile.Width < 120)
        {
            AnsiConsole.Profile.Width = 120; // a log file has no terminal width: keep the table on one line per row
        }

        try
        {
            return await Client.RunAsync(quick, json, grpc);
        }
        catch (Exception ex)
        {
            AnsiConsole.MarkupLine($"[red]FAILED[/] {Markup.Escape(ex.GetType().Name)}: {Markup.Escape(ex.Message)}");
            if (ex is not (OffloadRpcException or TimeoutException))
            {
                Console.Error.WriteLine(ex);
            }

            return 1;
        }
    }
}
