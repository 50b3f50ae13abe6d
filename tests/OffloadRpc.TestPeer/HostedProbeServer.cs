using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OffloadRpc.TestContracts;

/// <summary>
/// <see cref="ICallProbe"/> served by a Generic Host through OffloadRpc.Hosting: the implementation and its
/// dependency from DI (a scope per call, or one instance with --singleton), the probe's interceptor from
/// DI, a health check. Prints READY, HEALTH (after start and after stop) and OUTCOME of the last waiting call.
/// </summary>
internal static class HostedProbeServer
{
    public static async Task<int> RunAsync(string endpoint, string[] args)
    {
        bool singleton = args.Contains("--singleton");
        int shutdownMs = args.Contains("--shutdown-ms") ? int.Parse(args[Array.IndexOf(args, "--shutdown-ms") + 1]) : 30_000;
        HostApplicationBuilder builder = Host.CreateApplicationBuilder([]);
        builder.Logging.ClearProviders();
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromMilliseconds(shutdownMs));
        builder.Services.AddScoped<ProbeDependency>();
        builder.Services.AddOffloadRpcServer(endpoint, o => o.DispatchToThreadPool = true)
            .AddService<ICallProbe, CallProbe>(singleton ? ServiceLifetime.Singleton : ServiceLifetime.Scoped)
            .AddInterceptor<ProbeServerInterceptor>();
        if (singleton)
        {
            builder.Services.AddSingleton<ProbeDependency>();
        }

        builder.Services.AddHealthChecks().AddOffloadRpcServer();
        using IHost host = builder.Build();
        await host.StartAsync();
        HealthCheckService health = host.Services.GetRequiredService<HealthCheckService>();
        Console.WriteLine($"READY {endpoint}");
        Console.WriteLine($"HEALTH {(await health.CheckHealthAsync()).Status}");
        await Task.Run(() => Console.In.ReadToEnd());
        Console.WriteLine("STOPPING");
        await host.StopAsync();
        Console.WriteLine($"HEALTH {(await health.CheckHealthAsync()).Status}");
        Console.WriteLine($"OUTCOME {await new CallProbe(new ProbeDependency()).LastOutcomeAsync()}");
        return 0;
    }
}
