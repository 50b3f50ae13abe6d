using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using OffloadRpc.TestContracts;

/// <summary>
/// The typed services and the call probe in an ASP.NET Core app that serves them both ways: over shared
/// memory on <c>endpoint</c> (AddOffloadRpcServer) and over gRPC (h2c) on 127.0.0.1 with a port the
/// system picks and on a Unix socket beside the shared-memory one (MapOffloadRpcGrpc). Prints READY, the
/// socket path, the gRPC address and the gRPC Unix socket's path. With --traces, the
/// spans and server metrics of OffloadRpc are recorded for <see cref="ICallProbe.ServerLogAsync"/>; with
/// --max-message-bytes N, its OffloadRpcOptions.MaxMessageBytes is N; with --no-advertise, its
/// OffloadRpcOptions.AdvertiseSharedMemory is false; with --max-mappings N, buffers may add at most N
/// memory mappings to those the started server holds; with --max-buffered-request-bytes N, its
/// OffloadRpcOptions.MaxBufferedRequestBytes is N.
/// </summary>
internal static class GrpcServer
{
    public static async Task<int> RunAsync(string endpoint, string[] args)
    {
        using System.Diagnostics.ActivityListener? spans = args.Contains("--traces") ? ProbeServer.ListenToSpans() : null;
        using System.Diagnostics.Metrics.MeterListener? metrics = args.Contains("--traces") ? ProbeServer.ListenToMetrics() : null;
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        string socket = OffloadRpc.Transport.EndpointPath.Resolve(endpoint);
        string grpcSocket = socket + ".grpc";
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.Listen(System.Net.IPAddress.Loopback, 0, listen => listen.Protocols = HttpProtocols.Http2);
            kestrel.ListenUnixSocket(grpcSocket, listen => listen.Protocols = HttpProtocols.Http2);
        });
        builder.Services.AddScoped<ProbeDependency>();
        int index = Array.IndexOf(args, "--max-message-bytes");
        int? maxMessageBytes = index >= 0 ? int.Parse(args[index + 1], System.Globalization.CultureInfo.InvariantCulture) : null;
        int buffered = Array.IndexOf(args, "--max-buffered-request-bytes");
        builder.Services.AddOffloadRpcServer(endpoint, o =>
            {
                o.DispatchToThreadPool = true;
                o.MaxMessageBytes = maxMessageBytes ?? o.MaxMessageBytes;
                o.AdvertiseSharedMemory = !args.Contains("--no-advertise");
                o.MaxBufferedRequestBytes = buffered >= 0 ? long.Parse(args[buffered + 1], System.Globalization.CultureInfo.InvariantCulture) : o.MaxBufferedRequestBytes;
            })
            .AddService<IImageService, ImageService>(ServiceLifetime.Singleton)
            .AddService<IKitchenSink, KitchenSink>(ServiceLifetime.Singleton)
            .AddService<IFrameSource, FrameSource>(ServiceLifetime.Singleton)
            .AddService<ICallProbe, CallProbe>()
            .AddService<IUploadProbe, CallProbe>()
            .AddService<AotPing.IPing, AotPing.Ping>(ServiceLifetime.Singleton)
            .AddInterceptor<ProbeServerInterceptor>();
        await using WebApplication app = builder.Build();
        app.MapOffloadRpcGrpc();
        await app.StartAsync();
        int mappings = Array.IndexOf(args, "--max-mappings");
        if (mappings >= 0)
        {
            // The most mappings buffers may add from here (the backstop a hostile peer meets): a test sets it low.
            OffloadRpc.Transport.LocalLeases.MaxLiveMappings = OffloadRpc.Transport.SharedMemorySegment.LiveSegments + int.Parse(args[mappings + 1], System.Globalization.CultureInfo.InvariantCulture);
        }

        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First(a => a.StartsWith("http://127.0.0.1:", StringComparison.Ordinal));
        Console.WriteLine($"READY {socket} {address} {grpcSocket}");
        await Task.Run(() => Console.In.ReadToEnd());
        await app.StopAsync();
        File.Delete(grpcSocket);
        return 0;
    }
}
